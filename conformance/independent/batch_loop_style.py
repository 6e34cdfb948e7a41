"""batch_loop_style: every evaluation streams the epoch's batches through a Python generator.

Style: the epoch's batches are kept as fit produced them; ``EpochObjective.weighted_batches()`` is a
generator yielding ``(batch, n_b / N)`` and every evaluation is a loop over it, summing the
per-batch Keras loss (``compute_loss`` on ``model(x, training=False)``) times its share of the
rows, so the sum equals the full-batch loss (regularization and add_loss terms are counted once,
since the shares sum to 1). ``fun`` and ``jac`` are SEPARATE callables (``jac=callable``), no memo;
``hessp`` loops over the batches too, and the dense Hessian is one such HVP loop per unit vector.

BUG (deliberate): after ``scipy.optimize.minimize`` returns, ``result.x`` is NOT written back into
the model: the model is left at whatever point scipy evaluated last (a rejected trial point, the
last simplex vertex, a line-search probe ...), not at the optimum scipy reports. History ``loss`` and
metrics are Keras's values at the weights the model is left with. (On NaN/Inf or an exception the
best finite point is restored correctly.)

Supports: the 15 minimize methods with exactly their derivatives, bounds=(lo, hi) and NonNeg for
the bounded methods, history with metrics and nit/nfev/njev/nhev, all refusals, Keras 3 (tf-keras
works for the same calls). Refuses lm/trf/dogbox ("not supported").
"""

import inspect
import warnings

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

_DERIVATIVES = {
    "nelder-mead": (), "powell": (), "cobyla": (), "cobyqa": (),
    "cg": ("jac",), "bfgs": ("jac",), "l-bfgs-b": ("jac",), "tnc": ("jac",), "slsqp": ("jac",),
    "newton-cg": ("jac", "hessp"), "trust-ncg": ("jac", "hessp"), "trust-krylov": ("jac", "hessp"),
    "trust-constr": ("jac", "hessp"),
    "dogleg": ("jac", "hess"), "trust-exact": ("jac", "hess"),
}
_PRETTY = ["Nelder-Mead", "Powell", "CG", "BFGS", "Newton-CG", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP",
           "trust-constr", "dogleg", "trust-ncg", "trust-exact", "trust-krylov"]
_WITH_BOUNDS = ["L-BFGS-B", "TNC", "SLSQP", "trust-constr", "Nelder-Mead", "Powell", "COBYLA", "COBYQA"]
_TRUST_REGION = ["initial_trust_radius", "max_trust_radius", "eta", "gtol", "maxiter", "disp", "return_all"]
_OPTIONS = {
    "nelder-mead": ["maxiter", "maxfev", "disp", "return_all", "initial_simplex", "xatol", "fatol", "adaptive"],
    "powell": ["xtol", "ftol", "maxiter", "maxfev", "disp", "direc", "return_all"],
    "cg": ["gtol", "norm", "eps", "maxiter", "disp", "return_all", "finite_diff_rel_step", "c1", "c2", "workers"],
    "bfgs": ["gtol", "norm", "eps", "maxiter", "disp", "return_all", "finite_diff_rel_step", "xrtol", "c1", "c2",
             "hess_inv0", "workers"],
    "newton-cg": ["xtol", "eps", "maxiter", "disp", "return_all", "c1", "c2", "workers"],
    "l-bfgs-b": ["maxcor", "ftol", "gtol", "eps", "maxfun", "maxiter", "maxls", "finite_diff_rel_step", "workers"],
    "tnc": ["eps", "scale", "offset", "mesg_num", "maxCGit", "eta", "stepmx", "accuracy", "minfev", "ftol", "xtol",
            "gtol", "rescale", "disp", "finite_diff_rel_step", "maxfun", "workers"],
    "cobyla": ["rhobeg", "tol", "maxiter", "disp", "catol", "f_target"],
    "cobyqa": ["disp", "maxfev", "maxiter", "f_target", "feasibility_tol", "initial_tr_radius", "final_tr_radius",
               "scale"],
    "slsqp": ["maxiter", "ftol", "iprint", "disp", "eps", "finite_diff_rel_step", "workers"],
    "trust-constr": ["xtol", "gtol", "barrier_tol", "sparse_jacobian", "maxiter", "verbose", "finite_diff_rel_step",
                     "initial_constr_penalty", "initial_tr_radius", "initial_barrier_parameter",
                     "initial_barrier_tolerance", "factorization_method", "disp", "workers"],
    "dogleg": _TRUST_REGION, "trust-ncg": _TRUST_REGION,
    "trust-exact": _TRUST_REGION + ["subproblem_maxiter"], "trust-krylov": _TRUST_REGION + ["inexact"],
}


class _Diverged(Exception):
    pass


def _rows(x):
    first = next(leaf for leaf in tf.nest.flatten(x) if leaf is not None)
    return int(first.shape[0])


class EpochObjective:
    """Loss, gradient and curvature of the whole epoch, accumulated batch by batch."""

    def __init__(self, model, batches):
        self.model = model
        self.batches = batches
        self.total_rows = sum(_rows(b[0]) for b in batches)
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.counts = [int(np.prod(s)) for s in self.shapes]
        self.calls = {"fun": 0, "jac": 0, "hess": 0}
        self.best_value, self.best_point = np.inf, None
        extra = {"training": False} if "training" in inspect.signature(model.compute_loss).parameters else {}

        def batch_loss(x, y, sw):
            prediction = model(x, training=False)
            return tf.cast(model.compute_loss(x=x, y=y, y_pred=prediction, sample_weight=sw, **extra), tf.float64)

        def batch_gradient(x, y, sw):
            with tf.GradientTape() as tape:
                value = batch_loss(x, y, sw)
            return [tf.convert_to_tensor(g) for g in
                    tape.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)]

        def batch_hvp(x, y, sw, direction):
            with tf.GradientTape() as outer:
                grads = batch_gradient(x, y, sw)
                along = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) * d)
                                  for g, d in zip(grads, direction, strict=True)])
            return [tf.convert_to_tensor(h) for h in
                    outer.gradient(along, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)]

        self._batch_loss = tf.function(batch_loss, reduce_retracing=True)
        self._batch_gradient = tf.function(batch_gradient, reduce_retracing=True)
        self._batch_hvp = tf.function(batch_hvp, reduce_retracing=True)

    def weighted_batches(self):
        for x, y, sw in self.batches:
            yield (x, y, sw), _rows(x) / self.total_rows

    def get(self):
        return np.concatenate([np.ravel(np.asarray(v.numpy(), dtype=np.float64)) for v in self.variables])

    def put(self, point):
        offset = 0
        for variable, shape, count in zip(self.variables, self.shapes, self.counts, strict=True):
            chunk = np.asarray(point[offset:offset + count]).reshape(shape)
            variable.assign(tf.cast(chunk, variable.dtype))
            offset += count

    def _flat(self, tensors):
        return np.concatenate([np.ravel(np.asarray(t, dtype=np.float64)) for t in tensors])

    def _direction(self, vector):
        pieces, offset = [], 0
        for shape, count in zip(self.shapes, self.counts, strict=True):
            pieces.append(tf.constant(np.reshape(vector[offset:offset + count], shape), dtype=tf.float64))
            offset += count
        return pieces

    def current_loss(self):
        return float(sum(share * float(self._batch_loss(*batch)) for batch, share in self.weighted_batches()))

    def fun(self, point):
        self.calls["fun"] += 1
        self.put(point)
        value = self.current_loss()
        if not np.isfinite(value):
            raise _Diverged(f"non-finite loss {value}")
        if value < self.best_value:
            self.best_value, self.best_point = value, np.array(point, dtype=np.float64, copy=True)
        return value

    def jac(self, point):
        self.calls["jac"] += 1
        self.put(point)
        total = np.zeros(sum(self.counts))
        for batch, share in self.weighted_batches():
            total += share * self._flat(self._batch_gradient(*batch))
        return total

    def _hvp_here(self, vector):
        direction = self._direction(vector)
        total = np.zeros(sum(self.counts))
        for batch, share in self.weighted_batches():
            total += share * self._flat(self._batch_hvp(*batch, direction))
        return total

    def hessp(self, point, vector):
        self.calls["hess"] += 1
        self.put(point)
        return self._hvp_here(np.asarray(vector, dtype=np.float64))

    def hess(self, point):
        self.calls["hess"] += 1
        self.put(point)
        n = sum(self.counts)
        matrix = np.column_stack([self._hvp_here(np.eye(1, n, j).ravel()) for j in range(n)])
        return 0.5 * (matrix + matrix.T)


class BatchLoopTrainer:
    def __init__(self, model, method, maxiter, verbose, options):
        _refusals.require_compiled(model)
        if isinstance(method, str) and method.lower() in ("lm", "trf", "dogbox"):
            raise ValueError(f"Least-squares method {method!r} is not supported by batch_loop_style; use a "
                             "scipy.optimize.minimize method: " + ", ".join(_PRETTY))
        self.method = _refusals.canonical_method(method, _PRETTY)
        self.maxiter = _refusals.require_maxiter(maxiter)
        self.bounds = options.pop("bounds", None)
        _refusals.require_bounds_allowed(method, self.bounds, _WITH_BOUNDS)
        if self.bounds is not None:
            _refusals.bound_pair(self.bounds)
        _refusals.require_deterministic(model)
        _refusals.require_full_precision(model)
        self.tol = options.pop("tol", None)
        ignored = [name for name in options if name not in _OPTIONS[self.method]]
        if ignored:
            warnings.warn(f"method {method!r} does not use option(s) {ignored} (dropped); it uses "
                          f"{_OPTIONS[self.method]}", UserWarning, stacklevel=3)
        self.options = {k: v for k, v in options.items() if k not in ignored}
        self.model, self.verbose = model, verbose
        self.result = None
        self._epoch = None
        self._logs = None
        self._exhausted = False

    def __call__(self, iterator):
        history = getattr(self.model, "history", None)
        done = getattr(history, "epoch", None)
        epoch = None if history is None or done is None else (history, done, len(done))
        if epoch is not None and self._epoch is not None and all(
                a is b for a, b in zip(epoch[:2], self._epoch[:2], strict=True)) and epoch[2] == self._epoch[2]:
            if self._exhausted:
                raise StopIteration
            return self._logs
        steps = (getattr(history, "params", None) or {}).get("steps") if history is not None else None
        batches = []
        for batch in self._pull(iterator, steps):
            if isinstance(batch, (list, tuple)):
                batch = tuple(batch) + (None,) * (3 - len(batch))
            else:
                batch = (batch, None, None)
            batches.append(batch[:3])
        if not batches:
            raise ValueError("fit produced no batches (empty training data): provide at least one sample.")
        whole = []
        for i in range(3):
            parts = [b[i] for b in batches]
            whole.append(None if parts[0] is None else tf.nest.map_structure(
                lambda *leaves: np.concatenate([np.asarray(leaf) for leaf in leaves]), *parts))
        _refusals.require_data(*whole)
        _refusals.require_embedding_ids(self.model, whole[0])
        if not self.model.built or not self.model.trainable_variables:
            self.model(batches[0][0], training=False)
        if not self.model.trainable_variables:
            raise ValueError("Nothing to optimize: the model has no trainable weights.")
        self._logs = self._fit_epoch(batches)
        self._epoch = epoch
        self._exhausted = steps is None
        return self._logs

    @staticmethod
    def _pull(iterator, steps):
        taken = 0
        while steps is None or taken < steps:
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                return
            taken += 1
            yield batch

    def _box(self, objective, size):
        if self.method.lower() not in [m.lower() for m in _WITH_BOUNDS]:
            return None
        low, high = (-np.inf, np.inf) if self.bounds is None else _refusals.bound_pair(self.bounds)
        lower, upper = np.full(size, low), np.full(size, high)
        offset = 0
        for variable, count in zip(objective.variables, objective.counts, strict=True):
            if type(getattr(variable, "constraint", None)).__name__ == "NonNeg":
                lower[offset:offset + count] = np.maximum(lower[offset:offset + count], 0.0)
            offset += count
        if np.isinf(lower).all() and np.isinf(upper).all():
            return None
        return scipy.optimize.Bounds(lower, upper)

    def _fit_epoch(self, batches):
        objective = EpochObjective(self.model, batches)
        start = objective.get()
        box = self._box(objective, start.size)
        if box is not None:
            start = np.clip(start, box.lb, box.ub)
        options = dict(self.options)
        if self.maxiter is not None:
            key = "maxfun" if self.method == "tnc" else "maxiter"
            options[key] = max(self.maxiter, start.size + 2) if self.method == "cobyla" else self.maxiter
        wanted = _DERIVATIVES[self.method]
        kwargs = {name: getattr(objective, name) for name in wanted}
        if box is not None:
            kwargs["bounds"] = box
        if self.tol is not None:
            kwargs["tol"] = self.tol
        ticks = []
        kwargs["callback"] = lambda *args: ticks.append(1)
        try:
            result = scipy.optimize.minimize(objective.fun, start, method=self.method, options=options, **kwargs)
        except _Diverged as why:
            objective.put(objective.best_point if objective.best_point is not None else start)
            result = scipy.optimize.OptimizeResult(
                x=objective.best_point, fun=objective.best_value, nit=len(ticks), success=False,
                message=f"{why}: stopped and restored the best finite point evaluated")
        except BaseException:
            objective.put(objective.best_point if objective.best_point is not None else start)
            raise
        self.result = result
        # the model now holds the point scipy evaluated last
        self.model.reset_metrics()
        logs = {}
        for x, y, sw in batches:
            data = (x,) if y is None else (x, y) if sw is None else (x, y, sw)
            logs = self.model.test_step(data)
        logs = {name: float(np.asarray(value)) for name, value in dict(logs).items() if np.ndim(value) == 0}
        self.model.reset_metrics()
        logs["loss"] = objective.current_loss()
        nit = result.get("nit")
        logs["nit"] = int(nit if nit is not None else result.get("nfev", len(ticks)))
        logs["nfev"], logs["njev"], logs["nhev"] = (objective.calls["fun"], objective.calls["jac"],
                                                    objective.calls["hess"])
        if self.verbose:
            print(f"batch_loop_style {self.method}: loss {logs['loss']:.6g} after {logs['nit']} iterations, "
                  f"{logs['nfev']} evaluations ({result.message})")
        return logs


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    return BatchLoopTrainer(model, method, maxiter, verbose, options)
