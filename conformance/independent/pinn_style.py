"""pinn_style: the L-BFGS-B wrapper that physics-informed-network tutorials copy.

An ``LBFGSTrainer`` object holds the model. ``_get_flat()`` / ``_set_flat(x)`` move the trainable variables
(``model.trainable_variables`` in order, each raveled in C order) between a get_weights-like list of arrays and
one float64 vector; ``_set_flat`` writes with ``variable.assign``. ``loss_and_grad(x)`` sets the weights from x,
evaluates Keras's full-batch loss (``model.compute_loss`` on ``model(x, training=False)``, regularization and
add_loss terms included) under ``tf.GradientTape`` in the model's own dtype, and returns
``(float64 loss, float64 gradient)`` to ``scipy.optimize.minimize(method="L-BFGS-B", jac=True)``.
One scipy run per epoch over all the batches of the epoch, drained on the epoch's first call.

Levels offered: method "L-BFGS-B" only (every other method is refused in make_train_function);
gradient only (no hess/hessp curvature); bounds=(lo, hi) supported; no least squares; history gets
"loss" and the compiled metrics (no nit/nfev/njev/nhev counts). Dropout-like layers are not refused:
the objective evaluates them in inference mode. Bad input is refused through ``_refusals``.

BUG (deliberate): after scipy.optimize.minimize returns, result.x is NOT written back: the model keeps the
weights of the LAST point loss_and_grad evaluated (whatever point that was), and the history loss/metrics
are computed at those weights.
BUG (deliberate): no best point is kept: there is no try/except around minimize, so an exception or a
KeyboardInterrupt during the run propagates and leaves the model at the last evaluated point.
BUG (deliberate): ``_set_flat`` checks ``assert len(v.shape) <= 2`` (a bare assert, no message) for every
weight. It runs inside scipy's run (from loss_and_grad), not when x0 is built, so a model with a rank-3
weight (e.g. a Conv1D kernel) fails with a bare AssertionError raised during scipy's run.
"""

import sys

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

METHODS = ("L-BFGS-B",)


def _keras_for(model):
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras

        return tf_keras
    import keras

    return keras


def _concat(parts):
    """Concatenate a list of equally structured batches (None leaves stay None) along the sample axis."""
    if parts[0] is None:
        return None
    return tf.nest.map_structure(lambda *leaves: tf.concat(leaves, axis=0), *parts)


def _fit_locals():
    """The local variables of the Keras fit loop that called the train function (None if not called by fit)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        local = frame.f_locals
        if "epoch" in local and ("epoch_iterator" in local or "data_handler" in local):
            return local
        frame = frame.f_back
    return None


class LBFGSTrainer:
    """Holds the model; its instances are the train function Keras calls with a data iterator."""

    def __init__(self, model, maxiter=None, verbose=0, bounds=None, options=None):
        self.model = model
        self.keras = _keras_for(model)
        self.maxiter = maxiter
        self.verbose = verbose
        self.bounds = bounds
        self.options = dict(options or {})
        self.data = None
        self._epoch_key = None
        self._epoch_owner = None
        self._logs = None

    # ----------------------------------------------------------------- flat vector helpers
    def _get_flat(self):
        weights = [np.asarray(v.numpy(), dtype=np.float64) for v in self.model.trainable_variables]
        if not weights:
            return np.zeros(0)
        return np.concatenate([w.ravel() for w in weights])

    def _set_flat(self, x):
        start = 0
        for v in self.model.trainable_variables:
            assert len(v.shape) <= 2
            shape = tuple(int(d) for d in v.shape)
            size = int(np.prod(shape))
            v.assign(tf.cast(np.reshape(x[start:start + size], shape), v.dtype))
            start += size

    # ----------------------------------------------------------------- objective for scipy
    def loss_and_grad(self, x):
        self._set_flat(x)
        inputs, targets, weights = self.data
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            predictions = self.model(inputs, training=False)
            loss = self.model.compute_loss(inputs, targets, predictions, weights)
        grads = tape.gradient(loss, variables)
        flat = [np.zeros(int(np.prod(v.shape))) if g is None else
                np.asarray(tf.convert_to_tensor(g), np.float64).ravel() for v, g in zip(variables, grads, strict=True)]
        grad = np.concatenate(flat) if flat else np.zeros(0)
        return float(np.asarray(loss, dtype=np.float64)), grad

    # ----------------------------------------------------------------- one scipy run per epoch
    def _drain(self, iterator, limit):
        batches = []
        while limit is None or len(batches) < limit:
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            batches.append(self.keras.utils.unpack_x_y_sample_weight(batch))
        if not batches:
            _refusals.require_data([], None, None)
        inputs, targets, weights = (_concat([b[i] for b in batches]) for i in range(3))
        _refusals.require_data(inputs, targets, weights)
        _refusals.require_embedding_ids(self.model, inputs)
        if not self.model.built:
            self.model(inputs, training=False)
        return inputs, targets, weights

    def _run_epoch(self):
        x0 = self._get_flat()
        options = dict(self.options)
        if self.maxiter is not None:
            options["maxiter"] = self.maxiter
        bounds = None
        if self.bounds is not None:
            lo, hi = _refusals.bound_pair(self.bounds)
            bounds = scipy.optimize.Bounds(np.full(x0.size, lo), np.full(x0.size, hi))
        result = scipy.optimize.minimize(self.loss_and_grad, x0, method="L-BFGS-B", jac=True,
                                         bounds=bounds, options=options)
        if self.verbose:
            print(f"L-BFGS-B: {result.message} (loss {result.fun:.6g}, nit {result.nit}, nfev {result.nfev})")
        # The model keeps the weights the last loss_and_grad call wrote.
        self.model.reset_metrics()
        logs = self.model.test_step(self.data)
        return {name: float(np.asarray(value)) if np.size(value) == 1 else np.asarray(value)
                for name, value in logs.items()}

    def __call__(self, iterator):
        local = _fit_locals()
        if local is None:
            owner, key, limit, open_ended = iterator, ("iterator", id(iterator)), None, False
        elif "epoch_iterator" in local:  # Keras 3: a fresh iterator per epoch unless steps_per_epoch is given
            owner = local["epoch_iterator"]
            key, limit, open_ended = (id(owner), local["epoch"]), owner.steps_per_epoch, owner.num_batches is None
        else:  # tf_keras: arrays and repeated datasets share one iterator across all epochs
            owner = local["data_handler"]
            recreated = owner._adapter.should_recreate_iterator()
            limit = owner._steps_per_epoch if recreated else owner.inferred_steps
            key, open_ended = (id(owner), local["epoch"]), owner.inferred_steps is None
        if key == self._epoch_key:
            if open_ended:  # the data's size is unknown: end the epoch the way an exhausted iterator does
                raise StopIteration
            return self._logs
        self.data = self._drain(iterator, limit)
        self._epoch_key, self._epoch_owner = key, owner
        self._logs = self._run_epoch()
        return self._logs


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return an LBFGSTrainer to assign to ``model.train_function`` (only method "L-BFGS-B" is offered)."""
    name = method if isinstance(method, str) else repr(method)
    if not isinstance(method, str) or method.lower() != "l-bfgs-b":
        raise ValueError(f"pinn_style does not offer method {name!r}: the only supported method is 'L-BFGS-B'.")
    _refusals.require_compiled(model)
    maxiter = _refusals.require_maxiter(maxiter)
    bounds = options.pop("bounds", None)
    _refusals.require_bounds_allowed("L-BFGS-B", bounds, METHODS)
    if bounds is not None:
        _refusals.bound_pair(bounds)
    _refusals.require_full_precision(model)
    return LBFGSTrainer(model, maxiter=maxiter, verbose=verbose, bounds=bounds, options=options)
