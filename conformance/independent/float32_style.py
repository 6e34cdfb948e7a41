"""float32_style: the hand-written compiled TensorFlow loop.

On the epoch's first call the epoch's batches are drained and converted ONCE to float32 ``tf.constant`` tensors
(floating inputs, targets, sample weights; integer inputs such as embedding ids keep their dtype). One
``@tf.function`` computes the full-batch objective (the loss the model was compiled with, applied to
``model(x, training=False)``, plus ``model.losses``) and its gradient with ``tf.GradientTape``; the weights are
set from x with ``variable.assign`` on every call (no memo), and scipy gets float64 numpy values.
One scipy.optimize.minimize run per epoch; the model then holds result.x (on an exception or KeyboardInterrupt
during the run, the best point evaluated is written back and the exception propagates).

Levels offered: methods Nelder-Mead, Powell, CG, BFGS, L-BFGS-B, TNC, COBYLA, COBYQA, SLSQP and trust-constr
(trust-constr without hess/hessp: its own quasi-Newton approximation); jac=True only for the gradient methods
(CG, BFGS, L-BFGS-B, TNC, SLSQP, trust-constr). No curvature: Newton-CG, dogleg, trust-ncg, trust-krylov,
trust-exact and least squares (lm, trf, dogbox) are refused. bounds=(lo, hi) for the bounded methods
(Nelder-Mead, Powell, L-BFGS-B, TNC, COBYLA, COBYQA, SLSQP, trust-constr). History gets "loss" and the compiled
metrics at the final weights (Keras's own test_step, in the model's dtype) plus the counts nit (result.nit;
COBYLA reports none, so its nfev stands in), nfev, njev, nhev (counted by wrapping the callable scipy gets;
nhev is always 0). Stochastic layers (Dropout, GaussianNoise, ...) are always refused
(``_refusals.require_deterministic``); other bad input is refused through ``_refusals`` as well.

BUG (deliberate): the objective is computed in float32 even on a float64 model: the predictions are cast to the
float32 targets' dtype (``tf.cast(y_pred, y.dtype)``) and the loss and gradient come from there, then go to
scipy as float64 numpy. Only the precision is float32: on a float64 model f(x) differs from model.evaluate by
~1e-7 relative (so float64 finite differences of f are noise); on a float32 model it equals model.evaluate to
~1e-6.
BUG (deliberate): single-output models only: targets and predictions are stacked with ``tf.concat`` into one
tensor inside the tf.function, so a model with two outputs of different widths fails on the first call, inside
scipy's run, with TensorFlow's own (long) shape error, which is not caught.
"""

import sys

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

METHODS = ("Nelder-Mead", "Powell", "CG", "BFGS", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")
GRADIENT_METHODS = {"cg", "bfgs", "l-bfgs-b", "tnc", "slsqp", "trust-constr"}
BOUNDED_METHODS = ("Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")
NOT_OFFERED = ("Newton-CG", "dogleg", "trust-ncg", "trust-krylov", "trust-exact", "lm", "trf", "dogbox",
               "least_squares")


def _keras_of(model):
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras as keras
    else:
        import keras
    return keras


def _compiled_loss(model, keras):
    """The loss object/function given to compile, applied with Keras's sum-over-batch-size weighting."""
    loss = model.loss
    if isinstance(loss, dict):
        loss = next(iter(loss.values()))
    elif isinstance(loss, (list, tuple)):
        loss = loss[0]
    if isinstance(loss, keras.losses.Loss):
        return lambda y, y_pred, w: loss(y, y_pred, sample_weight=w)
    function = keras.losses.get(loss)

    def weighted_mean(y, y_pred, w):
        values = function(y, y_pred)
        if w is not None:
            w = tf.cast(w, values.dtype)
            while w.shape.rank > values.shape.rank and w.shape[-1] == 1:
                w = tf.squeeze(w, -1)
            while w.shape.rank < values.shape.rank:
                w = tf.expand_dims(w, -1)
            values = values * w
        return tf.reduce_sum(values) / tf.cast(tf.size(values), values.dtype)

    return weighted_mean


def _float32(structure, keep_integers=False):
    def convert(leaf):
        array = np.asarray(leaf)
        if keep_integers and array.dtype.kind not in "fc":
            return tf.constant(array)
        return tf.constant(array.astype(np.float32))

    return None if structure is None else tf.nest.map_structure(convert, structure)


def _caller_fit_loop():
    """(key, owner, batches to take, whether Keras needs StopIteration to end the epoch), read from fit's frame."""
    frame = sys._getframe(2)
    while frame is not None:
        local = frame.f_locals
        if "epoch" in local and "epoch_iterator" in local:  # Keras 3
            owner = local["epoch_iterator"]
            return (id(owner), local["epoch"]), owner, owner.steps_per_epoch, owner.num_batches is None
        if "epoch" in local and "data_handler" in local:  # tf_keras: arrays share one iterator over all epochs
            owner = local["data_handler"]
            fresh = owner._adapter.should_recreate_iterator()
            take = owner._steps_per_epoch if fresh else owner.inferred_steps
            return (id(owner), local["epoch"]), owner, take, owner.inferred_steps is None
        frame = frame.f_back
    return None


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return the train function to assign to ``model.train_function``."""
    if isinstance(method, str) and method.lower() in {name.lower() for name in NOT_OFFERED}:
        raise ValueError(f"float32_style does not offer method {method!r} (it needs Hessian products or least-squares "
                         "residuals); supported methods: " + ", ".join(METHODS))
    method = _refusals.canonical_method(method, METHODS)
    if "hess" in options or "hessp" in options:
        raise ValueError("float32_style offers trust-constr without hess/hessp: drop the hess/hessp option.")
    _refusals.require_compiled(model)
    maxiter = _refusals.require_maxiter(maxiter)
    bounds = options.pop("bounds", None)
    _refusals.require_bounds_allowed(method, bounds, BOUNDED_METHODS)
    bounds = None if bounds is None else _refusals.bound_pair(bounds)
    _refusals.require_full_precision(model)
    _refusals.require_deterministic(model)
    keras = _keras_of(model)
    loss_fn = _compiled_loss(model, keras)
    uses_gradient = method in GRADIENT_METHODS
    scipy_options = dict(options)
    if maxiter is not None:
        scipy_options["maxfun" if method == "tnc" else "maxiter"] = maxiter

    @tf.function(reduce_retracing=True)
    def value_and_gradient(inputs, targets, sample_weight):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=False)
            y = tf.concat(tf.nest.flatten(targets), axis=0)
            y_pred = tf.cast(tf.concat(tf.nest.flatten(outputs), axis=0), y.dtype)
            w = None if sample_weight is None else tf.concat(tf.nest.flatten(sample_weight), axis=0)
            loss = tf.cast(loss_fn(y, y_pred, w), tf.float32)
            for extra in model.losses:
                loss += tf.reduce_sum(tf.cast(extra, tf.float32))
        return loss, tape.gradient(loss, model.trainable_variables)

    def assign(x):
        start = 0
        for v in model.trainable_variables:
            shape = tuple(int(d) for d in v.shape)
            size = int(np.prod(shape))
            v.assign(tf.cast(np.reshape(x[start:start + size], shape), v.dtype))
            start += size

    def run_scipy(data, data32):
        x0 = np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in model.trainable_variables])
        counts = {"nfev": 0, "njev": 0, "nhev": 0}
        best = {"f": np.inf, "x": x0.copy()}

        def fun(x):
            counts["nfev"] += 1
            assign(x)
            loss, grads = value_and_gradient(*data32)
            f = float(loss.numpy())
            if f < best["f"]:
                best["f"], best["x"] = f, np.array(x, dtype=np.float64)
            if not uses_gradient:
                return f
            counts["njev"] += 1
            flat = [np.zeros(int(np.prod(v.shape))) if g is None else np.asarray(tf.convert_to_tensor(g)).ravel()
                    for v, g in zip(model.trainable_variables, grads, strict=True)]
            return f, np.concatenate(flat).astype(np.float64)

        limits = None
        if bounds is not None:
            limits = scipy.optimize.Bounds(np.full(x0.size, bounds[0]), np.full(x0.size, bounds[1]))
        try:
            result = scipy.optimize.minimize(fun, x0, method=method, jac=True if uses_gradient else None,
                                             bounds=limits, options=scipy_options)
        except BaseException:
            assign(best["x"])
            raise
        assign(result.x)
        if verbose:
            print(f"{method}: {result.message} (objective {result.fun:.6g}, nfev {counts['nfev']})")
        model.reset_metrics()
        logs = {name: float(np.asarray(value)) if np.size(value) == 1 else np.asarray(value)
                for name, value in model.test_step(data).items()}
        logs["nit"] = int(result.get("nit", counts["nfev"]))
        logs.update(counts)
        return logs

    state = {"key": None, "owner": None, "logs": None}

    def train_function(iterator):
        loop = _caller_fit_loop()
        key, owner, take, open_ended = loop if loop else (("iterator", id(iterator)), iterator, None, False)
        if key == state["key"]:
            if open_ended:  # unknown data size: end the epoch as an exhausted iterator would
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
        data32 = (_float32(x, keep_integers=True), _float32(y), _float32(sw))
        state["logs"] = run_scipy((x, y, sw), data32)
        state["key"], state["owner"] = key, owner
        return state["logs"]

    return train_function
