"""pinn_loss_style: the L-BFGS-B optimizer object of physics-informed-network tutorials, driving compute_loss.

A ``ScipyLBFGS`` object wraps the model the way PINN tutorials write it: the parameter vector is
``model.get_weights()`` flattened, written back with ``model.set_weights``; one ``@tf.function`` evaluates
``model.compute_loss`` (so a PINN's own loss, with its input derivatives, is what is minimized) under
``tf.GradientTape`` and returns the loss and the gradient; numpy values go to
``scipy.optimize.minimize(method="L-BFGS-B", jac=True)`` with the tutorials' options (``maxcor=50``,
``maxls=50``, ``ftol`` at machine epsilon). The collocation points (all of fit's data) are converted once to
float32 ``tf.constant``s, as tutorials do (integer inputs such as embedding ids keep their dtype). One scipy run
per epoch over all the epoch's batches, drained on the epoch's first call.

Levels offered: method "L-BFGS-B" only (every other method is refused in make_train_function); no
curvature; no bounds (``bounds=`` is refused); no least squares; history gets "loss" and the compiled
metrics (no nit/nfev/njev/nhev counts). Dropout-like layers are not refused: the objective runs the model in
inference mode. Other bad input is refused through ``_refusals``.

BUG (deliberate): the loss and gradient are computed in float32, as the tutorials' float32 models do: the
flat vector is cast to float32 (``tf.cast``) before ``set_weights``, and the loss and the gradient are cast to
float32 before they go to scipy. On a float32 model this is harmless; on a float64 model (a PINN in float64)
f and its gradient carry float32 rounding only.
BUG (deliberate): the non-trainable weights are in x: get_weights/set_weights hold every weight of the model
(a frozen input scaling, BatchNormalization statistics, frozen layers), in model.weights' order; the tape
watches only the trainable ones, so their gradient entries are zero.
BUG (deliberate): result.x is never written back: the model keeps the weights of the last point scipy
evaluated, and the history's loss and metrics are taken there.
"""

import sys

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals


def _keras_for(model):
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras

        return tf_keras
    import keras

    return keras


def _float32_constants(structure):
    """fit's data as tf.constant, floats in float32 (the tutorials' tf.cast(..., tf.float32))."""
    if structure is None:
        return None

    def convert(leaf):
        array = np.asarray(leaf)
        return tf.constant(array.astype(np.float32) if array.dtype.kind == "f" else array)

    return tf.nest.map_structure(convert, structure)


class ScipyLBFGS:
    """The optimizer object: builds the parameter vector from get_weights and runs scipy's L-BFGS-B."""

    def __init__(self, model, maxiter=None, verbose=0, options=None):
        self.model = model
        self.maxiter = maxiter
        self.verbose = verbose
        self.options = {"maxcor": 50, "maxls": 50, "ftol": float(np.finfo(float).eps), **(options or {})}
        self._loss_and_grads = tf.function(self._loss_and_grads_eager, reduce_retracing=True)

    # ------------------------------------------------------------------ the parameter vector
    def get_flat(self):
        return np.concatenate([np.ravel(w) for w in self.model.get_weights()]).astype(np.float64)

    def set_flat(self, flat):
        flat = tf.cast(flat, tf.float32).numpy()
        weights, start = [], 0
        for w in self.model.get_weights():
            weights.append(flat[start:start + w.size].reshape(w.shape).astype(w.dtype))
            start += w.size
        self.model.set_weights(weights)

    # ------------------------------------------------------------------ loss and gradient
    def _loss_and_grads_eager(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        variables = self.model.weights
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros(v.shape, tf.float32) if g is None else tf.cast(tf.reshape(tf.convert_to_tensor(g), [-1]),
                                                                          tf.float32)
                 for v, g in zip(variables, grads, strict=True)]
        return tf.cast(loss, tf.float32), tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)

    def evaluate(self, flat, data):
        self.set_flat(flat)
        loss, grads = self._loss_and_grads(*data)
        return loss.numpy().astype(np.float64), grads.numpy().astype(np.float64)

    def minimize(self, data):
        options = dict(self.options)
        if self.maxiter is not None:
            options["maxiter"] = self.maxiter
        result = scipy.optimize.minimize(self.evaluate, self.get_flat(), args=(data,), method="L-BFGS-B", jac=True,
                                         options=options)
        if self.verbose:
            print(f"L-BFGS-B: {result.message} after {result.nit} iterations, loss {result.fun:.6g}")
        return result


def _fit_loop():
    """(key of this epoch, how many batches to take, whether the data's size is unknown), from fit's frame."""
    frame = sys._getframe(2)
    for _ in range(10):
        if frame is None:
            return None
        local = frame.f_locals
        if "epoch" in local and "epoch_iterator" in local:  # Keras 3
            owner = local["epoch_iterator"]
            return (id(owner), local["epoch"]), owner.steps_per_epoch, owner.num_batches is None
        if "epoch" in local and "data_handler" in local:  # tf-keras
            owner = local["data_handler"]
            take = owner._steps_per_epoch if owner._adapter.should_recreate_iterator() else owner.inferred_steps
            return (id(owner), local["epoch"]), take, owner.inferred_steps is None
        frame = frame.f_back
    return None


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return the train function to assign to ``model.train_function`` (only method "L-BFGS-B")."""
    if not isinstance(method, str) or method.lower() != "l-bfgs-b":
        raise ValueError(f"pinn_loss_style does not offer method {method!r}: it runs L-BFGS-B only.")
    if options.get("bounds") is not None:
        raise ValueError("pinn_loss_style does not offer bounds: drop bounds=.")
    options.pop("bounds", None)
    _refusals.require_compiled(model)
    maxiter = _refusals.require_maxiter(maxiter)
    _refusals.require_full_precision(model)
    keras = _keras_for(model)
    optimizer = ScipyLBFGS(model, maxiter=maxiter, verbose=verbose, options=options)
    state = {"key": None, "logs": None}

    def train_function(iterator):
        loop = _fit_loop()
        key, take, open_ended = loop if loop else (("iterator", id(iterator)), None, False)
        if key == state["key"]:
            if open_ended:  # the data's size is unknown: end the epoch as an exhausted iterator does
                raise StopIteration
            return state["logs"]
        batches = []
        while take is None or len(batches) < take:
            try:
                batches.append(keras.utils.unpack_x_y_sample_weight(next(iterator)))
            except (StopIteration, tf.errors.OutOfRangeError):
                break
        if not batches:
            _refusals.require_data([], None, None)
        x, y, sw = (None if parts[0] is None else tf.nest.map_structure(lambda *t: tf.concat(t, 0), *parts)
                    for parts in zip(*batches, strict=True))
        _refusals.require_data(x, y, sw)
        _refusals.require_embedding_ids(model, x)
        if not model.built:
            model(x, training=False)
        optimizer.minimize((_float32_constants(x), _float32_constants(y), _float32_constants(sw)))
        # The model holds the weights of the last evaluation.
        model.reset_metrics()
        logs = model.test_step((x, y, sw))
        state["key"], state["logs"] = key, {name: float(np.asarray(v)) if np.size(v) == 1 else np.asarray(v)
                                            for name, v in logs.items()}
        return state["logs"]

    return train_function
