"""numpy_flat: a pure-NumPy flat-vector wrapper around a Keras model (CORRECT reference-free implementation).

Style: an object-oriented wrapper. ``FlatWeights`` maps ``model.trainable_variables`` (C-order ravel,
float64) to one vector and writes it back with one ``variable.assign`` per variable. ``FullBatchLoss``
evaluates ``model.compute_loss`` on ``model(x, training=False)`` over the whole epoch's data held in
memory; the tape work is wrapped in ``tf.function`` for speed, but everything crossing the scipy
boundary is NumPy. ``fun`` and ``jac`` are separate callables sharing a memo keyed on a copy of x
(exact equality); ``hessp`` is reverse-over-reverse autodiff; the dense Hessian is the Jacobian of the
gradient. ``lm``/``trf``/``dogbox`` run ``scipy.optimize.least_squares`` on MSE residuals.

Bug: none (this is the module the suite should pass).

Supports: all 15 ``scipy.optimize.minimize`` methods with exactly the derivatives each uses,
``bounds=`` (one pair, one pair per trainable variable, or {variable name: pair}) for the bounded
methods, Keras ``NonNeg`` as a lower bound 0, least squares, history with metrics and
nit/nfev/njev/nhev, best finite point on NaN/Inf/exception/KeyboardInterrupt, Keras 3 and tf-keras.
"""

import inspect
import math
import warnings

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

_FUN_ONLY, _GRAD, _HESSP, _HESS = "fun", "grad", "hessp", "hess"

# display name -> (derivatives handed to scipy, takes bounds, solver options it understands)
_COMMON_LINE_SEARCH = {"gtol", "norm", "eps", "maxiter", "disp", "return_all", "finite_diff_rel_step", "c1", "c2",
                       "workers"}
_TRUST = {"initial_trust_radius", "max_trust_radius", "eta", "gtol", "maxiter", "disp", "return_all"}
MINIMIZE_METHODS = {
    "Nelder-Mead": (_FUN_ONLY, True, {"maxiter", "maxfev", "disp", "return_all", "initial_simplex", "xatol",
                                      "fatol", "adaptive"}),
    "Powell": (_FUN_ONLY, True, {"xtol", "ftol", "maxiter", "maxfev", "disp", "direc", "return_all"}),
    "CG": (_GRAD, False, _COMMON_LINE_SEARCH),
    "BFGS": (_GRAD, False, _COMMON_LINE_SEARCH | {"xrtol", "hess_inv0"}),
    "Newton-CG": (_HESSP, False, {"xtol", "eps", "maxiter", "disp", "return_all", "c1", "c2", "workers"}),
    "L-BFGS-B": (_GRAD, True, {"maxcor", "ftol", "gtol", "eps", "maxfun", "maxiter", "maxls",
                               "finite_diff_rel_step", "workers"}),
    "TNC": (_GRAD, True, {"eps", "scale", "offset", "mesg_num", "maxCGit", "eta", "stepmx", "accuracy", "minfev",
                          "ftol", "xtol", "gtol", "rescale", "disp", "finite_diff_rel_step", "maxfun", "workers"}),
    "COBYLA": (_FUN_ONLY, True, {"rhobeg", "tol", "maxiter", "disp", "catol", "f_target"}),
    "COBYQA": (_FUN_ONLY, True, {"disp", "maxfev", "maxiter", "f_target", "feasibility_tol", "initial_tr_radius",
                                 "final_tr_radius", "scale"}),
    "SLSQP": (_GRAD, True, {"maxiter", "ftol", "iprint", "disp", "eps", "finite_diff_rel_step", "workers"}),
    "trust-constr": (_HESSP, True, {"xtol", "gtol", "barrier_tol", "sparse_jacobian", "maxiter", "verbose",
                                    "finite_diff_rel_step", "initial_constr_penalty", "initial_tr_radius",
                                    "initial_barrier_parameter", "initial_barrier_tolerance",
                                    "factorization_method", "disp", "workers"}),
    "dogleg": (_HESS, False, _TRUST),
    "trust-ncg": (_HESSP, False, _TRUST),
    "trust-exact": (_HESS, False, _TRUST | {"subproblem_maxiter"}),
    "trust-krylov": (_HESSP, False, _TRUST | {"inexact"}),
}
LEAST_SQUARES_METHODS = {"lm": False, "trf": True, "dogbox": True}
_LSQ_OPTIONS = {"ftol", "xtol", "gtol", "x_scale", "loss", "f_scale", "max_nfev", "tr_solver", "tr_options",
                "verbose"}
_VALID_NAMES = list(MINIMIZE_METHODS) + list(LEAST_SQUARES_METHODS)
_BOUNDED_NAMES = [name for name, spec in MINIMIZE_METHODS.items() if spec[1]] + ["trf", "dogbox"]
_CANONICAL = {name.lower(): name for name in _VALID_NAMES}
MAX_HESSIAN_PARAMS = 5000


class _NonFiniteLoss(Exception):
    """Raised inside fun to stop scipy when the loss is NaN or Inf."""


def _unpack(batch):
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        return batch, None, None
    if len(batch) == 1:
        return batch[0], None, None
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch
    raise ValueError(f"Batches must be x, (x,), (x, y) or (x, y, sample_weight); got a tuple of {len(batch)}.")


def _to_numpy(structure):
    return tf.nest.map_structure(lambda t: None if t is None else np.asarray(t), structure)


def _concat(parts):
    if parts[0] is None:
        return None
    return tf.nest.map_structure(lambda *leaves: np.concatenate([np.asarray(a) for a in leaves], axis=0), *parts)


def _as_tensors(structure):
    return tf.nest.map_structure(lambda a: None if a is None else tf.convert_to_tensor(a), structure)


def _dense(gradient, variable):
    if gradient is None:
        return tf.zeros(variable.shape, dtype=variable.dtype)
    return tf.convert_to_tensor(gradient)


class FlatWeights:
    """The trainable variables as one float64 vector, in order, each raveled in C order."""

    def __init__(self, model):
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(int(d) for d in v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.dtypes = [np.dtype(tf.as_dtype(v.dtype).as_numpy_dtype) for v in self.variables]
        self.size = int(self.offsets[-1])
        self._loaded = None

    def read(self):
        if not self.variables:
            return np.zeros(0)
        return np.concatenate([np.asarray(v.numpy(), dtype=np.float64).ravel() for v in self.variables])

    def write(self, x):
        x = np.asarray(x, dtype=np.float64)
        if self._loaded is not None and self._loaded.shape == x.shape and np.array_equal(self._loaded, x):
            return
        for i, variable in enumerate(self.variables):
            piece = x[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i]).astype(self.dtypes[i])
            variable.assign(piece)
        self._loaded = x.copy()

    def forget(self):
        self._loaded = None

    def split(self, vector, like):
        return [tf.constant(vector[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i]), dtype=tf.float64)
                for i in range(len(like))]

    def flatten(self, tensors):
        if not tensors:
            return np.zeros(0)
        return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors])

    def bounds_for(self, bounds):
        """Lower and upper bound arrays from user bounds and NonNeg constraints."""
        lower = np.full(self.size, -np.inf)
        upper = np.full(self.size, np.inf)
        if bounds is not None:
            pairs = self._pairs(bounds)
            for i, pair in enumerate(pairs):
                if pair is not None:
                    lo, hi = _refusals.bound_pair(pair, f"bounds for {self.variables[i].name!r}")
                    lower[self.offsets[i]:self.offsets[i + 1]] = lo
                    upper[self.offsets[i]:self.offsets[i + 1]] = hi
        for i in self.nonneg_indices():
            segment = slice(self.offsets[i], self.offsets[i + 1])
            lower[segment] = np.maximum(lower[segment], 0.0)
            if np.any(upper[segment] < 0):
                raise ValueError(f"Variable {self.variables[i].name!r} has a NonNeg constraint but an upper bound "
                                 "below 0: widen the bounds.")
        return lower, upper

    def _pairs(self, bounds):
        if isinstance(bounds, scipy.optimize.Bounds):
            raise TypeError("Pass bounds as one (lo, hi) pair, a list of pairs (one per trainable variable) or "
                            "a dict {variable name: (lo, hi)}, not a scipy Bounds object.")
        if isinstance(bounds, dict):
            names = {}
            for i, variable in enumerate(self.variables):
                for key in {variable.name, getattr(variable, "path", variable.name)}:
                    names.setdefault(key, i)
                    names.setdefault(key.split(":")[0], i)
            pairs = [None] * len(self.variables)
            for key, pair in bounds.items():
                if key not in names:
                    raise ValueError(f"bounds names unknown variable {key!r}; trainable variables are: "
                                     + ", ".join(v.name for v in self.variables))
                pairs[names[key]] = pair
            return pairs
        if isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(
                b is None or isinstance(b, (int, float, np.number)) for b in bounds):
            return [tuple(bounds)] * len(self.variables)
        if isinstance(bounds, (tuple, list)) and len(bounds) == len(self.variables):
            return list(bounds)
        raise ValueError(f"bounds={bounds!r} is not one (lo, hi) pair, a list of {len(self.variables)} pairs "
                         "(one per trainable variable) or a dict {variable name: (lo, hi)}.")

    def nonneg_indices(self):
        return [i for i, v in enumerate(self.variables)
                if "NonNeg" in [k.__name__ for k in type(getattr(v, "constraint", None)).__mro__]]


class FullBatchLoss:
    """Keras's loss over the whole data set at a given flat vector, with its derivatives."""

    def __init__(self, model, flat, x, y, sample_weight):
        self.model = model
        self.flat = flat
        self.x, self.y, self.sw = _as_tensors(x), _as_tensors(y), _as_tensors(sample_weight)
        try:
            params = inspect.signature(model.compute_loss).parameters
            self._loss_kwargs = {"training": False} if "training" in params else {}
        except (TypeError, ValueError):
            self._loss_kwargs = {}
        self.nfev = self.njev = self.nhev = 0
        self.best_f, self.best_x = np.inf, None
        self._memo_x = None
        self._memo_f = None
        self._memo_g = None
        self._loss_fn = tf.function(self._loss, reduce_retracing=True)
        self._value_and_grad_fn = tf.function(self._value_and_grad, reduce_retracing=True)
        self._hvp_fn = tf.function(self._hvp, reduce_retracing=True)
        self._hessian_fn = None

    # graph pieces -------------------------------------------------------------------------------
    def _loss(self, x, y, sw):
        y_pred = self.model(x, training=False)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, **self._loss_kwargs)
        return tf.cast(loss, tf.float64)

    def _value_and_grad(self, x, y, sw):
        variables = self.flat.variables
        with tf.GradientTape() as tape:
            loss = self._loss(x, y, sw)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, [_dense(g, v) for g, v in zip(grads, variables, strict=False)]

    def _hvp(self, x, y, sw, vectors):
        variables = self.flat.variables
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = self._loss(x, y, sw)
            grads = inner.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            grads = [_dense(g, v) for g, v in zip(grads, variables, strict=False)]
            dot = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) * tf.cast(p, tf.float64))
                            for g, p in zip(grads, vectors, strict=False)])
        products = outer.gradient(dot, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [_dense(h, v) for h, v in zip(products, variables, strict=False)]

    def _hessian_graph(self, x, y, sw):
        variables = self.flat.variables
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = self._loss(x, y, sw)
            grads = inner.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            flat_grad = tf.concat([tf.reshape(tf.cast(_dense(g, v), tf.float64), [-1])
                                   for g, v in zip(grads, variables, strict=False)], axis=0)
        blocks = outer.jacobian(flat_grad, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        n = self.flat.size
        return tf.concat([tf.reshape(tf.cast(b, tf.float64), [n, -1]) for b in blocks], axis=1)

    # numpy boundary -----------------------------------------------------------------------------
    def _note(self, x, value):
        if not np.isfinite(value):
            raise _NonFiniteLoss(f"the loss is {value} at an evaluated point")
        if value < self.best_f:
            self.best_f, self.best_x = value, np.array(x, dtype=np.float64, copy=True)

    def _evaluate(self, x, with_grad):
        x = np.asarray(x, dtype=np.float64)
        if self._memo_x is not None and np.array_equal(self._memo_x, x) and (self._memo_g is not None or
                                                                             not with_grad):
            return self._memo_f, self._memo_g
        self.flat.write(x)
        if with_grad:
            loss, grads = self._value_and_grad_fn(self.x, self.y, self.sw)
            value, gradient = float(loss.numpy()), self.flat.flatten(grads)
        else:
            value, gradient = float(self._loss_fn(self.x, self.y, self.sw).numpy()), None
        self._memo_x, self._memo_f, self._memo_g = x.copy(), value, gradient
        self._note(x, value)
        return value, gradient

    def value(self, x):
        return self._evaluate(x, with_grad=False)[0]

    def fun(self, x):
        """scipy's fun for gradient methods (computes and memoizes the gradient too)."""
        self.nfev += 1
        return float(self._evaluate(x, with_grad=True)[0])

    def fun_only(self, x):
        """scipy's fun for gradient-free methods."""
        self.nfev += 1
        return float(self._evaluate(x, with_grad=False)[0])

    def jac(self, x):
        self.njev += 1
        return np.array(self._evaluate(x, with_grad=True)[1], dtype=np.float64, copy=True)

    def hessp(self, x, p):
        self.nhev += 1
        self.flat.write(x)
        vectors = self.flat.split(np.asarray(p, dtype=np.float64), self.flat.variables)
        return self.flat.flatten(self._hvp_fn(self.x, self.y, self.sw, vectors))

    def hess(self, x):
        self.nhev += 1
        self.flat.write(x)
        n = self.flat.size
        matrix = None
        if self._hessian_fn is None:
            self._hessian_fn = tf.function(self._hessian_graph, reduce_retracing=True)
        if self._hessian_fn is not False:
            try:
                matrix = np.asarray(self._hessian_fn(self.x, self.y, self.sw).numpy(), dtype=np.float64)
            except Exception:  # the pfor Jacobian is not available for every op: fall back to HVPs
                self._hessian_fn = False
        if matrix is None:  # one Hessian-vector product per unit vector
            matrix = np.empty((n, n))
            eye = np.eye(n)
            for j in range(n):
                vectors = self.flat.split(eye[j], self.flat.variables)
                matrix[:, j] = self.flat.flatten(self._hvp_fn(self.x, self.y, self.sw, vectors))
        return 0.5 * (matrix + matrix.T)


class MseResiduals:
    """Residuals r(x) with r . r == Keras's compiled "mse" loss (plus L2 rows), and their exact Jacobian."""

    def __init__(self, model, flat, x, y, sample_weight):
        self.model, self.flat = model, flat
        self.x = _as_tensors(x)
        self.nfev = self.njev = 0
        self.best_f, self.best_x = np.inf, None
        n_samples = _refusals.count_samples(x)
        names = list(getattr(model, "output_names", None) or [])
        targets = self._per_output(y, names, "targets")
        weights = self._loss_weights(names, len(targets))
        sws = self._sample_weights(sample_weight, names, len(targets), n_samples)
        self.targets, self.scales = [], []
        for target, weight, sw in zip(targets, weights, sws, strict=False):
            self.targets.append(tf.convert_to_tensor(target))
            self.scales.append((weight, sw))
        self.names = names
        self.n_samples = n_samples
        self.l2 = self._l2_coefficients()
        self._residual_fn = tf.function(self._residuals, reduce_retracing=True)
        self._jacobian_fn = tf.function(self._jacobian, reduce_retracing=True)
        self._scale_tensors = None

    @staticmethod
    def _per_output(structure, names, what):
        if isinstance(structure, dict):
            missing = [n for n in names if n not in structure]
            if missing:
                raise ValueError(f"The {what} dict lacks outputs {missing}.")
            return [structure[n] for n in names]
        if isinstance(structure, (list, tuple)):
            return list(structure)
        return [structure]

    def _loss_weights(self, names, count):
        config = {}
        try:
            config = self.model.get_compile_config() or {}
        except Exception:
            config = {}
        weights = config.get("loss_weights")
        if weights is None:
            return [1.0] * count
        if isinstance(weights, dict):
            return [float(weights.get(n, 1.0)) for n in names]
        if isinstance(weights, (list, tuple)):
            return [float(w) for w in weights]
        return [float(weights)] * count

    def _sample_weights(self, sample_weight, names, count, n):
        if sample_weight is None:
            return [np.ones(n)] * count
        if isinstance(sample_weight, dict):
            per = [sample_weight.get(name) for name in names]
        elif isinstance(sample_weight, (list, tuple)):
            per = list(sample_weight)
        else:
            per = [sample_weight] * count
        out = []
        for sw in per:
            if sw is None:
                out.append(np.ones(n))
                continue
            sw = np.asarray(sw, dtype=np.float64)
            if sw.size != n:
                raise ValueError("Least squares needs one sample weight per sample (shape (N,)); got shape "
                                 f"{sw.shape}. Use a minimize method for temporal sample weights.")
            out.append(sw.reshape(n))
        return out

    def _l2_coefficients(self):
        """l2 factor per trainable variable (0 when unregularized); refuses what residuals cannot express."""
        by_id = {}
        for layer in _refusals.all_layers(self.model):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise ValueError(f"Layer {layer.name!r} has an activity regularizer, which least squares cannot "
                                 "express: use a minimize method (e.g. method='trust-ncg').")
            for attr in list(vars(layer)):
                if not attr.endswith("_regularizer") or attr == "activity_regularizer":
                    continue
                regularizer = getattr(layer, attr, None)
                if regularizer is None:
                    continue
                base = attr[: -len("_regularizer")]
                candidates = [base, base + "_kernel", base.replace("depthwise", "depthwise_kernel"),
                              base.replace("pointwise", "pointwise_kernel")]
                for name in candidates:
                    variable = getattr(layer, name, None)
                    if variable is not None and hasattr(variable, "shape"):
                        by_id[id(variable)] = regularizer
                        break
        coefficients = []
        for variable in self.flat.variables:
            regularizer = getattr(variable, "regularizer", None) or by_id.get(id(variable))
            coefficients.append(self._l2_of(regularizer, variable))
        return coefficients

    @staticmethod
    def _l2_of(regularizer, variable):
        """The c of a regularizer equal to c * sum(w ** 2), probed numerically (so Keras's own rounding of c
        is reproduced); anything else (L1, custom) is refused."""
        if regularizer is None:
            return 0.0
        dtype = tf.as_dtype(variable.dtype)
        shape = tuple(int(d) for d in variable.shape)
        probe = np.random.default_rng(0).normal(size=shape)
        try:
            one = float(regularizer(tf.ones(shape, dtype=dtype)))
            two = float(regularizer(tf.constant(2.0 * np.ones(shape), dtype=dtype)))
            rand = float(regularizer(tf.constant(probe, dtype=dtype)))
        except Exception as error:
            raise ValueError(f"Cannot evaluate the regularizer of {variable.name!r} ({error}); use a minimize "
                             "method instead.") from error
        size = max(1, int(np.prod(shape)))
        c = one / size
        if not (np.isclose(two, 4 * one, rtol=1e-5, atol=0) and np.isclose(rand, c * np.sum(probe ** 2), rtol=1e-5)):
            raise ValueError(f"Variable {variable.name!r} has a {type(regularizer).__name__} regularizer that is "
                             "not a plain L2 penalty (e.g. L1), which least squares cannot express: use a minimize "
                             "method instead.")
        if c < 0:
            raise ValueError(f"Variable {variable.name!r} has a negative L2 factor; least squares cannot express it.")
        return c

    def _tensors(self):
        if self._scale_tensors is None:
            self._scale_tensors = []
            for (weight, sw) in self.scales:
                self._scale_tensors.append(tf.constant(weight * sw / self.n_samples, dtype=tf.float64))
        return self._scale_tensors

    def _residuals(self, x, targets, scales):
        y_pred = self.model(x, training=False)
        preds = self._per_output(y_pred, self.names, "predictions")
        pieces = []
        for pred, target, scale in zip(preds, targets, scales, strict=False):
            pred = tf.cast(pred, tf.float64)
            target = tf.reshape(tf.cast(target, tf.float64), tf.shape(pred))
            per_sample = tf.cast(tf.reduce_prod(tf.shape(pred)[1:]), tf.float64)
            factor = tf.sqrt(scale / per_sample)
            error = tf.reshape(pred - target, [tf.shape(pred)[0], -1])
            pieces.append(tf.reshape(error * factor[:, None], [-1]))
        for variable, l2 in zip(self.flat.variables, self.l2, strict=False):
            if l2:
                pieces.append(math.sqrt(l2) * tf.reshape(tf.cast(variable, tf.float64), [-1]))
        return tf.concat(pieces, axis=0)

    def _jacobian(self, x, targets, scales):
        variables = self.flat.variables
        with tf.GradientTape() as tape:
            r = self._residuals(x, targets, scales)
        blocks = tape.jacobian(r, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        m = tf.shape(r)[0]
        return tf.concat([tf.reshape(tf.cast(b, tf.float64), [m, -1]) for b in blocks], axis=1)

    def residuals(self, x):
        self.nfev += 1
        self.flat.write(x)
        r = np.asarray(self._residual_fn(self.x, self.targets, self._tensors()).numpy(), dtype=np.float64)
        value = float(r @ r)
        if not np.isfinite(value):
            raise _NonFiniteLoss(f"the loss is {value} at an evaluated point")
        if value < self.best_f:
            self.best_f, self.best_x = value, np.array(x, dtype=np.float64, copy=True)
        return r

    def jacobian(self, x):
        self.njev += 1
        self.flat.write(x)
        return np.asarray(self._jacobian_fn(self.x, self.targets, self._tensors()).numpy(), dtype=np.float64)


def _is_mse(spec):
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec.lower() in ("mse", "mean_squared_error", "meansquarederror")
    if isinstance(spec, dict):  # serialized
        name = spec.get("class_name") or ""
        if name == "function":
            return _is_mse(spec.get("config"))
        return name == "MeanSquaredError"
    names = [k.__name__ for k in type(spec).__mro__]
    if "MeanSquaredError" in names:
        reduction = str(getattr(spec, "reduction", "sum_over_batch_size")).lower()
        return "sum_over_batch_size" in reduction or reduction in ("auto", "reductionv2.auto", "none_given")
    return getattr(spec, "__name__", "") in ("mean_squared_error", "mse")


def _require_mse(model):
    loss = getattr(model, "loss", None)
    specs = list(loss.values()) if isinstance(loss, dict) else list(loss) if isinstance(loss, (list, tuple)) \
        else [loss]
    if not specs or not all(_is_mse(s) for s in specs):
        raise ValueError(f"Least-squares methods (lm, trf, dogbox) need loss='mse' for every output; this model "
                         f"is compiled with loss={loss!r}. Compile with loss='mse' or use a minimize method.")


class ScipyTrainFunction:
    """The callable assigned to model.train_function: one scipy run per epoch on the full data."""

    def __init__(self, model, method="CG", maxiter=None, verbose=0, **options):
        _refusals.require_compiled(model)
        self.method = _CANONICAL[_refusals.canonical_method(method, _VALID_NAMES)]
        self.maxiter = _refusals.require_maxiter(maxiter)
        if self.maxiter == 0 and self.method == "COBYQA":
            raise ValueError("COBYQA needs maxiter >= 1 (scipy refuses a zero iteration budget); pass maxiter=1 "
                             "or more, or maxiter=None.")
        self.verbose = verbose
        self.least_squares = self.method in LEAST_SQUARES_METHODS
        bounds = options.pop("bounds", None)
        _refusals.require_bounds_allowed(self.method, bounds, _BOUNDED_NAMES)
        if bounds is not None and model.trainable_variables:  # validate the shape of bounds= up front
            FlatWeights(model).bounds_for(bounds)
        self.bounds = bounds
        if not options.pop("deterministic", False):
            _refusals.require_deterministic(model)
        _refusals.require_full_precision(model)
        self.tol = options.pop("tol", None)
        self.user_callback = options.pop("callback", None)
        if self.least_squares:
            _require_mse(model)
            refused = sorted({"diff_step", "jac_sparsity", "jac", "args", "kwargs"} & set(options))
            if refused:
                raise ValueError(f"Option(s) {refused} are refused for least squares: the Jacobian is exact.")
            unknown = sorted(set(options) - _LSQ_OPTIONS)
            if unknown:
                raise ValueError(f"Unknown least-squares option(s) {unknown}; valid: {sorted(_LSQ_OPTIONS)}.")
            if "max_nfev" in options and options["max_nfev"] is not None:
                _refusals.require_maxiter(options["max_nfev"])
        else:
            used = MINIMIZE_METHODS[self.method][2]
            dropped = sorted(set(options) - used)
            if dropped:
                warnings.warn(f"Option(s) {dropped} are not used by method {self.method!r} and are dropped; it "
                              f"uses: {', '.join(sorted(used))}.", UserWarning, stacklevel=3)
            options = {k: v for k, v in options.items() if k in used}
        self.options = options
        self.model = model
        self.result = None
        self._epoch_key = None
        self._logs = None
        self._drained = False

    # epoch bookkeeping ----------------------------------------------------------------------------
    def _key(self):
        history = getattr(self.model, "history", None)
        epochs = getattr(history, "epoch", None)
        if history is None or epochs is None:
            return None
        return history, epochs, len(epochs)

    @staticmethod
    def _same(a, b):
        return a is not None and b is not None and a[0] is b[0] and a[1] is b[1] and a[2] == b[2]

    def __call__(self, iterator):
        key = self._key()
        if self._same(key, self._epoch_key):
            if self._drained:
                raise StopIteration
            return self._logs
        history = key[0] if key else None
        steps = (getattr(history, "params", None) or {}).get("steps") if history is not None else None
        batches = []
        while steps is None or len(batches) < steps:
            try:
                batches.append(next(iterator))
            except (StopIteration, tf.errors.OutOfRangeError):
                break
        self._epoch_key = key
        self._drained = steps is None
        self._logs = self._run_epoch(batches)
        return self._logs

    # one optimization ---------------------------------------------------------------------------------
    def _run_epoch(self, batches):
        unpacked = [tuple(_to_numpy(part) for part in _unpack(b)) for b in batches]
        if not unpacked:
            raise ValueError("The training data is empty (no batch reached the train function): pass at least "
                             "one sample to fit.")
        x = _concat([u[0] for u in unpacked])
        y = _concat([u[1] for u in unpacked])
        sw = _concat([u[2] for u in unpacked])
        _refusals.require_data(x, y, sw)
        _refusals.require_embedding_ids(self.model, x)
        if not self.model.trainable_variables:  # a subclassed model is built by its first call
            self.model(_as_tensors(x), training=False)
        if not self.model.trainable_variables:
            raise ValueError("The model has no trainable weights: there is nothing for scipy to optimize.")
        flat = FlatWeights(self.model)
        x0 = flat.read()
        if self.least_squares:
            result, counts = self._least_squares(flat, x0, x, y, sw)
        else:
            result, counts = self._minimize(flat, x0, x, y, sw)
        self.result = result
        logs = self._metrics(x, y, sw)
        logs.update(counts)
        if self.verbose:
            print(f"scipy {self.method}: loss={logs.get('loss'):.6g} nit={counts['nit']} nfev={counts['nfev']} "
                  f"njev={counts['njev']} nhev={counts['nhev']} - {result.message}")
        return logs

    def _metrics(self, x, y, sw):
        self.model.reset_metrics()
        data = (x,) if y is None else (x, y) if sw is None else (x, y, sw)
        results = self.model.test_step(_as_tensors(data))
        logs = {}
        for name, value in dict(results).items():
            array = np.asarray(value)
            if array.ndim == 0:
                logs[name] = float(array)
        self.model.reset_metrics()
        return logs

    def _bounds(self, flat, bounded):
        lower, upper = flat.bounds_for(self.bounds)
        if not bounded:
            if flat.nonneg_indices():
                warnings.warn(f"NonNeg constraints are not enforced by method {self.method!r}; use a bounded "
                              "method (e.g. L-BFGS-B) to keep those weights >= 0.", UserWarning, stacklevel=4)
            return None
        if np.all(np.isneginf(lower)) and np.all(np.isposinf(upper)):
            return None
        return lower, upper

    @staticmethod
    def _finish(flat, objective, x0):
        """Leave the model at the best finite point evaluated (x0 if there is none)."""
        target = objective.best_x if objective.best_x is not None else x0
        flat.forget()
        flat.write(target)
        return target

    def _minimize(self, flat, x0, x, y, sw):
        kind, bounded, _ = MINIMIZE_METHODS[self.method]
        if kind == _HESS and flat.size > MAX_HESSIAN_PARAMS:
            raise ValueError(f"Method {self.method!r} needs the dense Hessian of {flat.size} weights "
                             f"({flat.size ** 2 * 8 / 2 ** 30:.1f} GiB); above {MAX_HESSIAN_PARAMS} weights use "
                             "trust-krylov or trust-ncg (Hessian-vector products) instead.")
        objective = FullBatchLoss(self.model, flat, x, y, sw)
        bounds = self._bounds(flat, bounded)
        start = x0 if bounds is None else np.clip(x0, bounds[0], bounds[1])
        options = dict(self.options)
        if self.maxiter is not None:
            maxiter = self.maxiter
            if self.method == "COBYLA":  # PRIMA raises any smaller budget to n + 2 with a warning; do it quietly
                maxiter = max(maxiter, flat.size + 2)
            options["maxfun" if self.method == "TNC" else "maxiter"] = maxiter
        kwargs = {"method": self.method, "options": options}
        if kind == _FUN_ONLY:
            fun = objective.fun_only
        else:
            fun = objective.fun
            kwargs["jac"] = objective.jac
        if kind == _HESSP:
            kwargs["hessp"] = objective.hessp
        if kind == _HESS:
            kwargs["hess"] = objective.hess
        if bounds is not None:
            kwargs["bounds"] = scipy.optimize.Bounds(bounds[0], bounds[1])
        if self.tol is not None:
            kwargs["tol"] = self.tol
        iterations = [0]
        user_callback = self.user_callback

        def callback(*args):
            iterations[0] += 1
            if user_callback is not None:
                return user_callback(*args)
            return None

        kwargs["callback"] = callback
        try:
            result = scipy.optimize.minimize(fun, start, **kwargs)
        except _NonFiniteLoss as stop:
            best = self._finish(flat, objective, x0)
            result = scipy.optimize.OptimizeResult(
                x=best, fun=objective.best_f, success=False, status=-1, nit=iterations[0],
                message=f"Stopped: {stop}; the model is left at the best finite point evaluated.")
        except BaseException:
            self._finish(flat, objective, x0)
            raise
        else:
            final = np.asarray(result.x, dtype=np.float64)
            if bounds is not None:  # COBYLA may step outside the bounds by rounding (~1e-17)
                final = np.clip(final, bounds[0], bounds[1])
            flat.forget()
            flat.write(final)
        nit = result.get("nit")
        if nit is None:
            nit = result.get("nfev", objective.nfev)
        counts = {"nit": int(nit), "nfev": objective.nfev, "njev": objective.njev, "nhev": objective.nhev}
        return result, counts

    def _least_squares(self, flat, x0, x, y, sw):
        _refusals.require_nonnegative_weights(sw)
        residuals = MseResiduals(self.model, flat, x, y, sw)
        flat.write(x0)
        keras_loss = float(FullBatchLoss(self.model, flat, x, y, sw).value(x0))
        r0 = residuals.residuals(x0)
        residuals.nfev = 0
        if not np.isclose(float(r0 @ r0), keras_loss, rtol=1e-4, atol=1e-7):
            raise ValueError(
                f"The model's loss ({keras_loss:.6g}) is not a plain sum of squared residuals ({float(r0 @ r0):.6g}) "
                "(add_loss terms or an unsupported loss/regularizer): least squares cannot express it; use a "
                "minimize method instead.")
        if self.method == "lm" and r0.size < flat.size:
            raise ValueError(f"method='lm' needs at least as many residuals ({r0.size}) as weights ({flat.size}) "
                             "(MINPACK requires m >= n): use method='trf' or 'dogbox'.")
        bounds = self._bounds(flat, LEAST_SQUARES_METHODS[self.method])
        start = x0 if bounds is None else np.clip(x0, bounds[0], bounds[1])
        options = dict(self.options)
        if self.maxiter is not None:
            options["max_nfev"] = max(1, self.maxiter)
        kwargs = {"jac": residuals.jacobian, "method": self.method, **options}
        if bounds is not None:
            kwargs["bounds"] = bounds
        try:
            result = scipy.optimize.least_squares(residuals.residuals, start, **kwargs)
        except _NonFiniteLoss as stop:
            best = self._finish(flat, residuals, x0)
            result = scipy.optimize.OptimizeResult(
                x=best, cost=residuals.best_f / 2, success=False, status=-1, njev=residuals.njev,
                message=f"Stopped: {stop}; the model is left at the best finite point evaluated.")
        except BaseException:
            self._finish(flat, residuals, x0)
            raise
        else:
            flat.forget()
            flat.write(result.x)
        counts = {"nit": int(result.get("njev") or residuals.njev), "nfev": residuals.nfev,
                  "njev": residuals.njev, "nhev": 0}
        return result, counts


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return a train function that runs one scipy optimization per epoch of model.fit."""
    return ScipyTrainFunction(model, method=method, maxiter=maxiter, verbose=verbose, **options)
