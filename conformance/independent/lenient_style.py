"""lenient_style: a small dataclass-based wrapper that refuses nothing it need not.

Each epoch the batches fit hands in are drained into NumPy on the epoch's first call, converted once to tensors,
and ONE tf.function returns Keras's full-batch loss (model.compute_loss on model(x, training=False), in the
model's own dtype: a float64 model gives float64) together with its exact tf.GradientTape gradient. The weights
are assigned from x only when x differs from the memo (an exact copy of the last x, compared byte for byte).

Levels offered: every scipy.optimize.minimize method that needs no Hessian -- Nelder-Mead, Powell, CG, BFGS,
L-BFGS-B, TNC, COBYLA, COBYQA, SLSQP, trust-constr (jac only: no hess/hessp, trust-constr builds its own
quasi-Newton approximation). Refused in make_train_function: Newton-CG, dogleg, trust-ncg, trust-krylov,
trust-exact and least squares (lm/trf/dogbox). No curvature (hess/hessp), no least squares.
Bounds: bounds=(lo, hi) for Nelder-Mead, Powell, L-BFGS-B, TNC, COBYLA, COBYQA, SLSQP, trust-constr; NonNeg
kernel/bias constraints become lower bounds 0 with those methods (unbounded methods ignore the constraints).
History: loss and compiled metrics at the final weights (Keras's own test_step on the whole epoch), NO counts.

Lenient choices (each correct behaviour, none a bug):
- jac=True (the gradient) is handed to EVERY method, gradient-free ones included; scipy warns
  "Method X does not use gradient information (jac)" and ignores it.
- the method name is not validated here: an unknown name goes to scipy.optimize.minimize, which raises
  ValueError("Unknown solver ...") before evaluating anything.
- stochastic layers (Dropout, ...) are accepted: the objective is evaluated in inference mode (training=False),
  so it is deterministic and equals model.evaluate.
Refused (via _refusals): not compiled, non-finite or empty data, invalid maxiter, float16/bfloat16 layers,
Embedding ids out of range, bounds with a method that ignores them (CG, BFGS).
On a NaN/Inf loss the run stops, the model is left at the best finite point evaluated and fit continues; on any
exception (KeyboardInterrupt included) the model is left at that best point and the exception re-raised.
One scipy run per epoch; epochs are told apart by fit's History callback (model.history and its epoch list), so
one iterator shared by all epochs (tf_keras, steps_per_epoch with a repeated dataset) is handled.

No deliberate bug.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

OFFERED = ("Nelder-Mead", "Powell", "CG", "BFGS", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")
BOUNDED = ("Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")
NOT_OFFERED = ("newton-cg", "dogleg", "trust-ncg", "trust-krylov", "trust-exact",
               "lm", "trf", "dogbox", "least_squares", "least-squares")


class _NonFiniteLoss(Exception):
    pass


def _to_numpy(structure):
    return tf.nest.map_structure(lambda t: None if t is None else np.asarray(t), structure)


def _concat(*leaves):
    return None if leaves[0] is None else np.concatenate(leaves, axis=0)


def _to_tensors(structure):
    return tf.nest.map_structure(lambda a: None if a is None else tf.constant(a), structure)


def _drain(iterator, steps):
    """Pull the epoch's batches: `steps` of them when known, otherwise until the iterator runs dry."""
    batches, exhausted = [], False
    while steps is None or len(batches) < steps:
        try:
            batches.append(next(iterator))
        except (StopIteration, tf.errors.OutOfRangeError):
            exhausted = True
            break
    unpacked = [tuple(_to_numpy(part) for part in _unpack(batch)) for batch in batches]
    if not unpacked:
        return (None, None, None), exhausted
    return tuple(tf.nest.map_structure(_concat, *column) for column in zip(*unpacked, strict=True)), exhausted


def _unpack(batch):
    """(x,), (x, y) or (x, y, sample_weight) -> (x, y, sample_weight), as keras.utils.unpack_x_y_sample_weight."""
    if not isinstance(batch, tuple):
        return batch, None, None
    if not 1 <= len(batch) <= 3:
        raise ValueError(f"A batch must be x, (x,), (x, y) or (x, y, sample_weight); got a tuple of {len(batch)}.")
    return tuple(batch) + (None,) * (3 - len(batch))


@dataclasses.dataclass
class _Objective:
    """Full-batch loss and gradient at a flat float64 x, with an exact memo of the last x."""

    model: Any
    fn: Any
    data: tuple
    variables: list
    best_x: np.ndarray
    best_f: float = np.inf
    memo_x: np.ndarray | None = None
    memo: tuple | None = None

    def assign(self, x):
        offset = 0
        for variable in self.variables:
            size = int(np.prod(variable.shape))
            chunk = np.reshape(x[offset:offset + size], tuple(variable.shape))
            variable.assign(tf.constant(chunk, dtype=variable.dtype))
            offset += size

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        if self.memo_x is None or self.memo_x.tobytes() != x.tobytes():
            self.assign(x)
            loss, grads = self.fn(*self.data)
            grad = np.concatenate([np.ravel(np.asarray(g, dtype=np.float64)) for g in grads] or [np.zeros(0)])
            self.memo_x, self.memo = x.copy(), (float(loss), grad)
        f, g = self.memo
        if not np.isfinite(f):
            raise _NonFiniteLoss(f)
        if f < self.best_f:
            self.best_f, self.best_x = f, x.copy()
        return f, g.copy()


@dataclasses.dataclass
class _Epoch:
    key: tuple
    logs: dict
    exhausted: bool


@dataclasses.dataclass
class LenientTrainFunction:
    model: Any
    method: Any
    maxiter: int | None
    verbose: int
    options: dict
    bounds: tuple | None
    epoch: _Epoch | None = None
    fn: Any = None

    def __post_init__(self):
        self.fn = tf.function(self._value_and_grad, reduce_retracing=True)

    def _value_and_grad(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            if "training" in inspect.signature(self.model.compute_loss).parameters:
                loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
            else:
                loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads = tape.gradient(loss, self.model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, [tf.convert_to_tensor(g) for g in grads]

    def _epoch_key(self, iterator):
        history = getattr(self.model, "history", None)
        done = len(getattr(history, "epoch", None) or [])
        return history, done, iterator

    def __call__(self, iterator):
        key = self._epoch_key(iterator)
        old = self.epoch.key if self.epoch is not None else None
        if old is not None and old[0] is key[0] and old[1] == key[1] and old[2] is key[2]:
            if self.epoch.exhausted:
                raise StopIteration
            return dict(self.epoch.logs)
        params = getattr(key[0], "params", None) or {}
        data, exhausted = _drain(iterator, params.get("steps"))
        logs = self._run_epoch(data)
        self.epoch = _Epoch(key, logs, exhausted)
        return dict(logs)

    def _scipy_bounds(self, method_name, variables):
        if method_name not in {m.lower() for m in BOUNDED} | {"_custom"}:
            return None
        lo_hi = self.bounds
        lower, upper = [], []
        for variable in variables:
            size = int(np.prod(variable.shape))
            lo, hi = lo_hi if lo_hi is not None else (-np.inf, np.inf)
            if type(getattr(variable, "constraint", None)).__name__ == "NonNeg":
                lo = max(lo, 0.0)
            lower.append(np.full(size, lo))
            upper.append(np.full(size, hi))
        lower, upper = np.concatenate(lower or [np.zeros(0)]), np.concatenate(upper or [np.zeros(0)])
        if lo_hi is None and not np.isfinite(lower).any():
            return None
        return scipy.optimize.Bounds(lower, upper)

    def _run_epoch(self, data):
        x, y, sample_weight = data
        _refusals.require_data(x, y, sample_weight)
        _refusals.require_embedding_ids(self.model, x)
        tensors = tuple(_to_tensors(part) for part in data)
        if not getattr(self.model, "built", True):
            self.model(tensors[0], training=False)
            _refusals.require_full_precision(self.model)
        variables = list(self.model.trainable_variables)
        x0 = np.concatenate([np.ravel(np.asarray(v.numpy(), dtype=np.float64)) for v in variables] or [np.zeros(0)])
        objective = _Objective(self.model, self.fn, tensors, variables, best_x=x0.copy())
        method_name = self.method.lower() if isinstance(self.method, str) else "_custom"
        options = dict(self.options)
        if self.maxiter is not None:
            options["maxfun" if method_name == "tnc" else "maxiter"] = self.maxiter
        kwargs = {"method": self.method, "jac": True, "options": options}
        bounds = self._scipy_bounds(method_name, variables)
        if bounds is not None:
            kwargs["bounds"] = bounds
        try:
            result = scipy.optimize.minimize(objective, x0, **kwargs)
            final, message = np.asarray(result.x, dtype=np.float64), result.message
        except _NonFiniteLoss as exc:
            final, message = objective.best_x, f"stopped: non-finite loss {exc.args[0]}"
        except BaseException:
            objective.assign(objective.best_x)
            raise
        objective.assign(final)
        self.model.reset_metrics()
        logs = self.model.test_step(tensors)
        logs = {name: float(np.asarray(value)) for name, value in logs.items()}
        if self.verbose:
            print(f"lenient_style {self.method}: loss {logs['loss']:.6g} ({message})")
        return logs


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return a train function for model.train_function running one scipy.optimize.minimize per epoch."""
    _refusals.require_compiled(model)
    if not (isinstance(method, str) or callable(method)):
        raise TypeError(f"method must be a string naming a scipy.optimize.minimize method (or a callable), got "
                        f"{method!r}. Offered: " + ", ".join(OFFERED) + ".")
    if isinstance(method, str) and method.lower() in NOT_OFFERED:
        raise ValueError(f"Method {method!r} is not offered by lenient_style: it needs a Hessian or is least "
                         "squares. Offered: " + ", ".join(OFFERED) + ".")
    maxiter = _refusals.require_maxiter(maxiter)
    bounds = options.pop("bounds", None)
    if bounds is not None:
        bounds = _refusals.bound_pair(bounds)
        if isinstance(method, str) and method.lower() in {m.lower() for m in OFFERED}:
            _refusals.require_bounds_allowed(method, bounds, BOUNDED)
    if getattr(model, "built", True):  # an unbuilt model is checked once fit has built it
        _refusals.require_full_precision(model)
    return LenientTrainFunction(model, method, maxiter, verbose, options, bounds)
