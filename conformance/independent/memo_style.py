"""memo_style: a class-based wrapper whose SEPARATE fun / jac (and hessp / hess) callables share one memoized
evaluation, the usual "avoid computing the loss twice" pattern.

Levels offered: every scipy.optimize.minimize method. Nelder-Mead, Powell, COBYLA and COBYQA get no derivatives;
CG, BFGS, L-BFGS-B, TNC and SLSQP get jac=<callable>; Newton-CG, trust-ncg, trust-krylov and trust-constr also get
hessp=<callable> (exact Hessian-vector product by double tf.GradientTape); dogleg and trust-exact get hess=<callable>
(dense exact Hessian, the Jacobian of the gradient). bounds=(lo, hi) for Nelder-Mead, Powell, L-BFGS-B, TNC, COBYLA,
COBYQA, SLSQP and trust-constr. Least squares (lm/trf/dogbox) is refused. History gets the loss and the compiled
metrics at the final weights plus nit (when scipy reports it) and nfev/njev/nhev counted from scipy's calls.
Works on Keras 3 (TF backend) and tf_keras. Stochastic layers (Dropout, ...) are refused.

The objective is the model's full-batch loss over every batch of the epoch (drained on the epoch's first call),
in inference mode and in the model's dtype, with float64 numpy at the scipy boundary. An epoch is recognised by
(model.history, number of finished epochs, iterator); exactly history.params["steps"] batches are drained when
known, else until the data runs out. result.x is written back; on an exception (KeyboardInterrupt included) the
model is left at the lowest finite loss evaluated and the exception is re-raised.

BUG (deliberate): the memo key is cheap, key = float(np.sum(x)). fun(x) and jac(x) return the cached (f, g) when
the key equals the cached key, and hessp / hess only re-assign the weights from x when np.sum(x) differs from the
sum of the point last assigned ("skip the assign if nothing changed"). Two different points with the same sum (a
permutation of x, or x with +d on one entry and -d on another) therefore get stale values, gradients and
curvature products.
"""

import importlib
import inspect

import numpy as np
import tensorflow as tf
from scipy import optimize

from . import _refusals

GRADIENT_FREE = ("Nelder-Mead", "Powell", "COBYLA", "COBYQA")
GRADIENT = ("CG", "BFGS", "L-BFGS-B", "TNC", "SLSQP")
HESSP = ("Newton-CG", "trust-ncg", "trust-krylov", "trust-constr")
HESS = ("dogleg", "trust-exact")
METHODS = GRADIENT_FREE + GRADIENT + HESSP + HESS
BOUNDED = ("Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")
LEAST_SQUARES = ("lm", "trf", "dogbox")
_ZERO = tf.UnconnectedGradients.ZERO


def _keras_of(model):
    legacy = any(klass.__module__.startswith("tf_keras") for klass in type(model).__mro__)
    return importlib.import_module("tf_keras" if legacy else "keras")


def _concat(*parts):
    return None if parts[0] is None else tf.concat(parts, axis=0)


class MemoObjective:
    """fun / jac / hessp / hess of the full-batch loss on one epoch's data, sharing one cached evaluation."""

    def __init__(self, model, data, need_grad=True):
        self.model, self.data, self.need_grad = model, data, need_grad
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.key = self.f = self.g = self.assigned_sum = None
        self.best_f, self.best_x = np.inf, None
        self.counts = {"nfev": 0, "njev": 0, "nhev": 0}
        self._loss_has_training = "training" in inspect.signature(model.compute_loss).parameters

    def weights(self):
        return np.concatenate([np.asarray(v.numpy(), dtype=np.float64).ravel() for v in self.variables])

    def assign(self, x):
        parts = np.split(np.asarray(x, dtype=np.float64), np.cumsum(self.sizes)[:-1])
        for variable, part, shape in zip(self.variables, parts, self.shapes, strict=True):
            variable.assign(tf.cast(part.reshape(shape), variable.dtype))
        self.assigned_sum = float(np.sum(x))

    def _loss(self):
        x, y, sample_weight = self.data
        y_pred = self.model(x, training=False)
        kwargs = {"training": False} if self._loss_has_training else {}
        return self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **kwargs)

    def _flat(self, tensors):
        return np.concatenate([np.asarray(tf.convert_to_tensor(t), dtype=np.float64).ravel() for t in tensors])

    def _evaluate(self, x):
        key = float(np.sum(x))  # BUG (deliberate): points with the same sum share one cache entry
        if key != self.key:
            self.assign(x)
            with tf.GradientTape() as tape:
                loss = self._loss()
            self.f = float(np.asarray(loss, dtype=np.float64))
            self.g = None
            if self.need_grad:
                self.g = self._flat(tape.gradient(loss, self.variables, unconnected_gradients=_ZERO))
            self.key = key
            if np.isfinite(self.f) and self.f < self.best_f:
                self.best_f, self.best_x = self.f, np.array(x, dtype=np.float64)
        return self.f, self.g

    def fun(self, x):
        self.counts["nfev"] += 1
        return self._evaluate(x)[0]

    def jac(self, x):
        self.counts["njev"] += 1
        return self._evaluate(x)[1].copy()

    def _assign_if_changed(self, x):
        if float(np.sum(x)) != self.assigned_sum:  # BUG (deliberate): "nothing changed" judged by the sum
            self.assign(x)

    def _gradient_tensors(self, inner):
        with inner:
            loss = self._loss()
        return [tf.convert_to_tensor(g) for g in inner.gradient(loss, self.variables, unconnected_gradients=_ZERO)]

    def hessp(self, x, p):
        self.counts["nhev"] += 1
        self._assign_if_changed(x)
        p_parts = np.split(np.asarray(p, dtype=np.float64), np.cumsum(self.sizes)[:-1])
        with tf.GradientTape() as outer:
            grads = self._gradient_tensors(tf.GradientTape())
            dot = tf.add_n([tf.reduce_sum(g * tf.cast(part.reshape(shape), g.dtype))
                            for g, part, shape in zip(grads, p_parts, self.shapes, strict=True)])
        return self._flat(outer.gradient(dot, self.variables, unconnected_gradients=_ZERO))

    def hess(self, x):
        self.counts["nhev"] += 1
        self._assign_if_changed(x)
        with tf.GradientTape(persistent=True) as outer:
            grads = self._gradient_tensors(tf.GradientTape())
            flat_grad = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        try:
            blocks = outer.jacobian(flat_grad, self.variables, unconnected_gradients=_ZERO)
        except Exception:  # some ops have no pfor converter: fall back to a while loop
            blocks = outer.jacobian(flat_grad, self.variables, unconnected_gradients=_ZERO,
                                    experimental_use_pfor=False)
        n = flat_grad.shape[0]
        matrix = np.concatenate([np.asarray(b, dtype=np.float64).reshape(n, -1) for b in blocks], axis=1)
        return 0.5 * (matrix + matrix.T)


class ScipyTrainFunction:
    """The callable that replaces model.train_function: one scipy.optimize.minimize run per epoch."""

    def __init__(self, model, method, maxiter, verbose, bounds, options):
        self.model, self.method, self.maxiter, self.verbose = model, method, maxiter, verbose
        self.bounds, self.options = bounds, options
        self.keras = _keras_of(model)
        self._epoch = None  # (history, finished epochs, iterator) of the epoch whose logs are stored
        self._logs, self._exhausted = None, False

    def __call__(self, iterator):
        history = getattr(self.model, "history", None)
        finished = len(getattr(history, "epoch", None) or [])
        epoch = self._epoch
        if epoch is not None and epoch[0] is history and epoch[1] == finished and epoch[2] is iterator:
            if self._exhausted:  # size unknown to Keras: StopIteration ends the epoch
                raise StopIteration
        else:
            steps = (getattr(history, "params", None) or {}).get("steps")
            data, self._exhausted = self._drain(iterator, steps, started=finished > 0)
            self._logs = self._run(data)
            self._epoch = (history, finished, iterator)
        counter = getattr(self.model, "_train_counter", None)  # tf_keras: steps run (its progress bar reads it)
        if counter is not None:
            counter.assign_add(1)
        return self._logs

    def _drain(self, iterator, steps, started):
        unpack = self.keras.utils.unpack_x_y_sample_weight
        batches, exhausted = [], False
        while steps is None or len(batches) < steps:
            try:
                batches.append(tuple(unpack(next(iterator))))
            except (StopIteration, tf.errors.OutOfRangeError):
                exhausted = True
                break
        if not batches and started:  # the data ran out after earlier epochs: let Keras stop as it does
            raise StopIteration
        data = tf.nest.map_structure(_concat, *batches) if batches else (None, None, None)
        _refusals.require_data(*data)
        return data, exhausted

    def _run(self, data):
        model = self.model
        _refusals.require_deterministic(model)
        _refusals.require_embedding_ids(model, data[0])
        if not model.built or not model.trainable_variables:
            model(data[0], training=False)
        _refusals.require_full_precision(model)
        objective = MemoObjective(model, data, need_grad=self.method not in GRADIENT_FREE)
        kwargs = {"method": self.method, "options": dict(self.options)}
        if self.maxiter is not None:
            kwargs["options"]["maxfun" if self.method == "TNC" else "maxiter"] = self.maxiter
        if self.method not in GRADIENT_FREE:
            kwargs["jac"] = objective.jac
        if self.method in HESSP:
            kwargs["hessp"] = objective.hessp
        if self.method in HESS:
            kwargs["hess"] = objective.hess
        x0 = objective.weights()
        if self.bounds is not None:
            kwargs["bounds"] = optimize.Bounds(np.full(x0.size, self.bounds[0]), np.full(x0.size, self.bounds[1]))
        try:
            result = optimize.minimize(objective.fun, x0, **kwargs)
        except BaseException:
            if objective.best_x is not None:
                objective.assign(objective.best_x)
            raise
        objective.assign(result.x)
        model.reset_metrics()
        logs = {name: float(np.asarray(value)) for name, value in model.test_step(data).items()}
        if getattr(result, "nit", None) is not None:
            logs["nit"] = int(result.nit)
        logs.update(objective.counts)
        if self.verbose:
            print(f"memo_style {self.method}: {result.message} loss={logs.get('loss')} "
                  + " ".join(f"{k}={v}" for k, v in objective.counts.items()))
        return logs


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return a train function for model.train_function that runs scipy.optimize.minimize once per epoch."""
    _refusals.require_compiled(model)
    if isinstance(method, str) and method.lower() in LEAST_SQUARES:
        raise ValueError(f"Method {method!r} is a least squares method, which memo_style does not offer; "
                         "use one of the scipy.optimize.minimize methods: " + ", ".join(METHODS))
    lowered = _refusals.canonical_method(method, METHODS)
    method = next(name for name in METHODS if name.lower() == lowered)
    maxiter = _refusals.require_maxiter(maxiter)
    bounds = options.pop("bounds", None)
    _refusals.require_bounds_allowed(method, bounds, BOUNDED)
    if bounds is not None:
        bounds = _refusals.bound_pair(bounds)
    _refusals.require_full_precision(model)
    _refusals.require_deterministic(model)
    return ScipyTrainFunction(model, method, maxiter, verbose, bounds, options)
