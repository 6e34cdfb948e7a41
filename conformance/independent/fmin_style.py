"""fmin_style: built on scipy's classic optimizer wrappers instead of ``scipy.optimize.minimize``.

Style: a small class, ``KerasObjective``, exposes ``f(x)``, ``fprime(x)`` and ``fhess_p(x, p)`` and the
train function dispatches to ``fmin_ncg(f, x0, fprime, fhess_p=..., args=())`` (Newton-CG),
``fmin_l_bfgs_b`` (L-BFGS-B, with bounds), ``fmin_tnc`` (TNC, with bounds), ``fmin_cg`` (CG) and
``fmin_bfgs`` (BFGS), with ``full_output`` where the wrapper offers it and an iteration-counting
``callback`` for ``nit``. The objective is Keras's loss over the whole data set in one batch
(``tf.function`` of ``compute_loss`` on ``model(x, training=False)``), value and gradient memoized
together on a copy of x.

BUG (deliberate): ``fhess_p(x, p)`` ignores its ``x`` and computes the Hessian-vector product at the
weights the model currently holds, i.e. wherever the last ``f``/``fprime`` evaluation left them (the
keras-opt fork's bug). It is right only when scipy asks for the HVP at the point it evaluated last;
any other call order (a line search that accepts an earlier trial point, a memo hit, a caller that
probes several points) gives the curvature of the wrong point. Only Newton-CG uses it.

Supports: CG, BFGS, Newton-CG, L-BFGS-B, TNC (case-insensitive); any other method, including the
gradient-free, trust-region and least-squares ones, is refused with a ValueError listing the five.
bounds=(lo, hi) and NonNeg for L-BFGS-B and TNC; history with metrics and nit/nfev/njev/nhev; best
finite point on NaN/Inf/exception; all refusals; Keras 3 (tf-keras works for the same calls).
"""

import inspect

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

SUPPORTED = ("CG", "BFGS", "Newton-CG", "L-BFGS-B", "TNC")
TAKES_BOUNDS = ("L-BFGS-B", "TNC")
# keyword options each wrapper accepts from the user (scipy names, as in minimize's options where they exist)
WRAPPER_OPTIONS = {
    "cg": {"gtol", "norm", "c1", "c2"},
    "bfgs": {"gtol", "norm", "c1", "c2", "xrtol", "hess_inv0"},
    "newton-cg": {"avextol", "xtol", "c1", "c2"},
    "l-bfgs-b": {"m", "maxcor", "factr", "ftol", "pgtol", "gtol", "maxfun", "maxls"},
    "tnc": {"scale", "offset", "maxCGit", "eta", "stepmx", "accuracy", "fmin", "minfev", "ftol", "xtol", "pgtol",
            "gtol", "rescale"},
}
_ALIASES = {"newton-cg": {"xtol": "avextol"}, "l-bfgs-b": {"maxcor": "m", "gtol": "pgtol"},
            "tnc": {"gtol": "pgtol", "minfev": "fmin"}}


class NonFiniteLoss(ArithmeticError):
    pass


def _unpack(batch):
    if isinstance(batch, (list, tuple)):
        parts = list(batch) + [None] * (3 - len(batch))
        return tuple(parts[:3])
    return batch, None, None


def _join(parts):
    if parts[0] is None:
        return None
    return tf.nest.map_structure(lambda *xs: tf.concat([tf.convert_to_tensor(v) for v in xs], axis=0), *parts)


class KerasObjective:
    """Full-batch Keras loss with f / fprime / fhess_p in the shape the fmin_* wrappers expect."""

    def __init__(self, model, x, y, sample_weight):
        self.model = model
        self.data = (x, y, sample_weight)
        self.variables = model.trainable_variables
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.nfev = self.njev = self.nhev = 0
        self.best = (np.inf, None)
        self._cache = None
        train_kw = {"training": False} if "training" in inspect.signature(model.compute_loss).parameters else {}

        def loss(x_, y_, sw_):
            return tf.cast(model.compute_loss(x=x_, y=y_, y_pred=model(x_, training=False), sample_weight=sw_,
                                              **train_kw), tf.float64)

        def value_and_gradient(x_, y_, sw_):
            with tf.GradientTape() as tape:
                value = loss(x_, y_, sw_)
            grads = tape.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return value, tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float64), [-1])
                                     for g in grads], axis=0)

        def hessian_times(x_, y_, sw_, direction):
            with tf.GradientTape() as outer:
                _, flat_grad = value_and_gradient(x_, y_, sw_)
                projected = tf.reduce_sum(flat_grad * direction)
            hv = outer.gradient(projected, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(h), tf.float64), [-1]) for h in hv], axis=0)

        self._loss = tf.function(loss)
        self._value_and_gradient = tf.function(value_and_gradient)
        self._hessian_times = tf.function(hessian_times)

    def read(self):
        return np.concatenate([np.asarray(v.numpy(), np.float64).reshape(-1) for v in self.variables])

    def load(self, x):
        for v, piece in zip(self.variables, np.split(np.asarray(x, np.float64), np.cumsum(self.sizes)[:-1]),
                            strict=True):
            v.assign(piece.reshape(tuple(v.shape)).astype(np.dtype(tf.as_dtype(v.dtype).as_numpy_dtype)))

    def _compute(self, x):
        if self._cache is not None and np.array_equal(self._cache[0], x):
            return self._cache[1], self._cache[2]
        self.load(x)
        value, gradient = self._value_and_gradient(*self.data)
        value, gradient = float(value), np.asarray(gradient, dtype=np.float64)
        self._cache = (np.array(x, dtype=np.float64, copy=True), value, gradient)
        if not np.isfinite(value):
            raise NonFiniteLoss(f"the loss is {value}")
        if value < self.best[0]:
            self.best = (value, self._cache[0])
        return value, gradient

    def f(self, x):
        self.nfev += 1
        return self._compute(x)[0]

    def fprime(self, x):
        self.njev += 1
        return self._compute(x)[1].copy()

    def fhess_p(self, x, p):
        self.nhev += 1
        # the weights are already loaded by the f/fprime call that scipy made just before
        return np.asarray(self._hessian_times(*self.data, tf.constant(np.asarray(p, np.float64))), np.float64)

    def loss_here(self):
        return float(self._loss(*self.data))


def _bounds(model, method_key, pair, n):
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    if pair is not None:
        lower[:], upper[:] = _refusals.bound_pair(pair)
    if method_key in ("l-bfgs-b", "tnc"):
        start = 0
        for v in model.trainable_variables:
            size = int(np.prod(v.shape))
            if type(getattr(v, "constraint", None)).__name__ == "NonNeg":
                lower[start:start + size] = np.maximum(lower[start:start + size], 0.0)
            start += size
    if not (np.isfinite(lower).any() or np.isfinite(upper).any()):
        return None
    return [(None if np.isinf(lo) else lo, None if np.isinf(hi) else hi) for lo, hi in zip(lower, upper,
                                                                                          strict=True)]


def _call_wrapper(key, objective, x0, maxiter, options, bounds, iterations):
    """Run one fmin_* wrapper; returns (x, nit, message). `iterations` is a one-item list the callback bumps."""

    def count(*_):
        iterations[0] += 1

    if key == "cg":
        kw = dict(options, maxiter=maxiter) if maxiter is not None else dict(options)
        x, _, _, _, flag = scipy.optimize.fmin_cg(objective.f, x0, fprime=objective.fprime, full_output=True,
                                                  disp=False, callback=count, **kw)
        return x, iterations[0], {0: "converged", 1: "maxiter reached", 2: "precision loss / line search failed",
                                  3: "NaN result"}.get(flag, str(flag))
    if key == "bfgs":
        kw = dict(options, maxiter=maxiter) if maxiter is not None else dict(options)
        out = scipy.optimize.fmin_bfgs(objective.f, x0, fprime=objective.fprime, full_output=True, disp=False,
                                       callback=count, **kw)
        return out[0], iterations[0], {0: "converged", 1: "maxiter reached", 2: "precision loss / line search failed",
                                       3: "NaN result"}.get(out[-1], str(out[-1]))
    if key == "newton-cg":
        kw = dict(options, maxiter=maxiter) if maxiter is not None else dict(options)
        out = scipy.optimize.fmin_ncg(objective.f, x0, objective.fprime, fhess_p=objective.fhess_p, args=(),
                                      full_output=True, disp=False, callback=count, **kw)
        return out[0], iterations[0], {0: "converged", 1: "maxiter reached", 2: "line search failure",
                                       3: "NaN result", 4: "precision loss"}.get(out[-1], str(out[-1]))
    if key == "l-bfgs-b":
        kw = dict(options)
        if maxiter is not None:
            kw["maxiter"] = maxiter
        x, _, info = scipy.optimize.fmin_l_bfgs_b(objective.f, x0, fprime=objective.fprime, bounds=bounds,
                                                  callback=count, **kw)
        message = info.get("task")
        return x, int(info.get("nit", iterations[0])), message.decode() if isinstance(message, bytes) else message
    # tnc
    kw = dict(options)
    if maxiter is not None:
        kw["maxfun"] = maxiter
    x, _, rc = scipy.optimize.fmin_tnc(objective.f, x0, fprime=objective.fprime, bounds=bounds, messages=0,
                                       callback=count, **kw)
    return x, iterations[0], _TNC_CODES.get(rc, f"return code {rc}")


_TNC_CODES = {-1: "infeasible (lower bound > upper bound)", 0: "local minimum reached (|pg| ~= 0)",
              1: "converged (|f_n-f_(n-1)| ~= 0)", 2: "converged (|x_n-x_(n-1)| ~= 0)",
              3: "max. number of function evaluations reached", 4: "linear search failed",
              5: "all lower bounds are equal to the upper bounds", 6: "unable to progress",
              7: "user requested end of minimization"}


class FminTrainFunction:
    def __init__(self, model, method, maxiter, verbose, options):
        _refusals.require_compiled(model)
        if not isinstance(method, str) or method.lower() not in [m.lower() for m in SUPPORTED]:
            raise ValueError(f"fmin_style supports only the classic scipy wrappers' methods: {', '.join(SUPPORTED)}; "
                             f"got method={method!r}.")
        self.key = method.lower()
        self.maxiter = _refusals.require_maxiter(maxiter)
        self.pair = options.pop("bounds", None)
        _refusals.require_bounds_allowed(method, self.pair, TAKES_BOUNDS)
        if self.pair is not None:
            _refusals.bound_pair(self.pair)
        _refusals.require_deterministic(model)
        _refusals.require_full_precision(model)
        allowed = WRAPPER_OPTIONS[self.key]
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"Option(s) {unknown} are not accepted by the {method} wrapper; it accepts: "
                             + ", ".join(sorted(allowed)))
        aliases = _ALIASES.get(self.key, {})
        self.options = {aliases.get(k, k): v for k, v in options.items()}
        if self.key == "l-bfgs-b" and "ftol" in self.options:  # fmin_l_bfgs_b takes factr = ftol / eps
            self.options["factr"] = self.options.pop("ftol") / np.finfo(float).eps
        self.model, self.verbose = model, verbose
        self.result = None
        self._seen = None
        self._logs = None
        self._until_stop = False

    def __call__(self, iterator):
        history = getattr(self.model, "history", None)
        epoch_list = getattr(history, "epoch", None)
        here = (history, epoch_list, None if epoch_list is None else len(epoch_list))
        if (self._seen is not None and history is not None and here[0] is self._seen[0]
                and here[1] is self._seen[1] and here[2] == self._seen[2]):
            if self._until_stop:
                raise StopIteration
            return self._logs
        steps = None
        if history is not None and getattr(history, "params", None):
            steps = history.params.get("steps")
        collected = []
        while steps is None or len(collected) < steps:
            try:
                collected.append(_unpack(next(iterator)))
            except (StopIteration, tf.errors.OutOfRangeError):
                break
        if not collected:
            raise ValueError("The train function received no data (empty training set): give fit at least one "
                             "sample.")
        x, y, sw = (_join([c[i] for c in collected]) for i in range(3))
        _refusals.require_data(x, y, sw)
        _refusals.require_embedding_ids(self.model, x)
        if not self.model.trainable_variables:
            self.model(x, training=False)
        if not self.model.trainable_variables:
            raise ValueError("The model has no trainable weights (nothing for the wrapper to optimize).")
        self._logs = self._optimize(x, y, sw)
        self._seen = here
        self._until_stop = steps is None
        return self._logs

    def _optimize(self, x, y, sw):
        objective = KerasObjective(self.model, x, y, sw)
        x0 = objective.read()
        bounds = _bounds(self.model, self.key, self.pair, x0.size)
        if bounds is not None:
            lo = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
            hi = np.array([np.inf if b[1] is None else b[1] for b in bounds])
            x0 = np.clip(x0, lo, hi)
        iterations = [0]
        try:
            x_final, nit, message = _call_wrapper(self.key, objective, x0, self.maxiter, self.options, bounds,
                                                  iterations)
        except NonFiniteLoss as problem:
            x_final = objective.best[1] if objective.best[1] is not None else x0
            nit, message = iterations[0], f"aborted: {problem}; model restored to the best finite point evaluated"
        except BaseException:
            objective.load(objective.best[1] if objective.best[1] is not None else x0)
            raise
        objective.load(x_final)
        self.result = scipy.optimize.OptimizeResult(x=np.asarray(x_final), nit=nit, nfev=objective.nfev,
                                                    njev=objective.njev, nhev=objective.nhev, message=message)
        self.model.reset_metrics()
        data = (x,) if y is None else (x, y) if sw is None else (x, y, sw)
        logs = {k: float(np.asarray(v)) for k, v in dict(self.model.test_step(data)).items() if np.ndim(v) == 0}
        self.model.reset_metrics()
        logs.update(nit=int(nit), nfev=objective.nfev, njev=objective.njev, nhev=objective.nhev)
        if self.verbose:
            print(f"[fmin_style] {self.key}: loss={logs['loss']:.6g} nit={nit} nfev={objective.nfev} ({message})")
        return logs


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    return FminTrainFunction(model, method, maxiter, verbose, options)
