"""cached_style: a functional wrapper (module-level functions plus one closure as the train function) that hands
scipy.optimize.minimize ONE combined callable fun(x) -> (f, g) with jac=True, over an exact cache: a dict keyed on
x.tobytes() holding (f, g) for every point ever evaluated ("scipy revisits points; never compute twice").

Levels offered: L-BFGS-B, CG, BFGS, TNC and SLSQP (gradient methods; no curvature, no hess / hessp; every other
method, least squares included, is refused with a ValueError). bounds=(lo, hi) for L-BFGS-B, TNC and SLSQP. History
gets the loss and the compiled metrics at the final weights plus nit (from scipy) and nfev / njev (scipy's calls of
the combined callable). Works on Keras 3 (TF backend) and tf_keras. Stochastic layers (Dropout, ...) are refused.

The objective is the model's full-batch loss over every batch of the epoch (drained on the epoch's first call:
exactly history.params["steps"] batches when Keras knows the count, else until the data runs out), in inference
mode, computed in the model's dtype and handed to scipy as float64. result.x is written back; on an exception
(KeyboardInterrupt included) the model is left at the lowest finite loss scipy asked for, and the exception re-raised.

BUGS (deliberate):
a) The cache lives as long as the train function and is never cleared when the data changes. A second model.fit on
   different data with the same train function, whose points were already evaluated in the first fit (e.g. its x0
   equals the first fit's final weights, which the first run evaluated), is answered with the FIRST data set's loss
   and gradient at those points (points never seen before are right).
b) Epochs are detected by the identity of the iterator Keras hands in: a new iterator object means a new epoch
   (drain it, run scipy), the same object means "same epoch: return the stored logs". Keras 3 hands a new iterator
   per epoch for arrays, so that works there; but where Keras keeps one iterator across epochs (Keras 3 with
   steps_per_epoch on a repeated tf.data dataset; tf_keras for arrays, generators and datasets given a steps_per_epoch
   other than their size, so on tf_keras every multi-epoch fit on arrays runs scipy once) only the first epoch runs
   scipy and every later epoch returns the first epoch's logs (weights unchanged). tf_keras does recreate the iterator
   for a tf.data dataset without steps_per_epoch and for a keras.utils.Sequence, where epochs are told apart right.
"""

import importlib

import numpy as np
import tensorflow as tf
from scipy import optimize

from . import _refusals

METHODS = ("L-BFGS-B", "CG", "BFGS", "TNC", "SLSQP")
BOUNDED = ("L-BFGS-B", "TNC", "SLSQP")
_SCIPY_METHODS = ("nelder-mead", "powell", "cg", "bfgs", "newton-cg", "l-bfgs-b", "tnc", "cobyla", "cobyqa", "slsqp",
                  "trust-constr", "dogleg", "trust-ncg", "trust-exact", "trust-krylov", "lm", "trf", "dogbox")


def keras_module(model):
    """The Keras package the model belongs to: tf_keras (legacy) or Keras 3."""
    legacy = any(klass.__module__.startswith("tf_keras") for klass in type(model).__mro__)
    return importlib.import_module("tf_keras" if legacy else "keras")


def drain(iterator, steps, unpack):
    """Pull the epoch's batches: `steps` of them when known, else until the iterator runs out."""
    batches, exhausted = [], False
    while steps is None or len(batches) < steps:
        try:
            batches.append(tuple(unpack(next(iterator))))
        except (StopIteration, tf.errors.OutOfRangeError):
            exhausted = True
            break
    return batches, exhausted


def stack(batches):
    """(x, y, sample_weight) of all batches concatenated along the sample axis (nested structures kept)."""
    if not batches:
        return None, None, None
    return tf.nest.map_structure(lambda *parts: None if parts[0] is None else tf.concat(parts, axis=0), *batches)


def get_flat_weights(model):
    return np.concatenate([np.asarray(v.numpy(), dtype=np.float64).ravel() for v in model.trainable_variables])


def set_flat_weights(model, x):
    offset = 0
    for variable in model.trainable_variables:
        size = int(np.prod(variable.shape))
        part = np.asarray(x[offset:offset + size], dtype=np.float64).reshape(tuple(variable.shape))
        variable.assign(tf.cast(part, variable.dtype))
        offset += size


def loss_and_grad(model, data):
    """Keras's full-batch loss (inference mode) and its exact gradient, as (float, float64 vector)."""
    x, y, sample_weight = data
    with tf.GradientTape() as tape:
        y_pred = model(x, training=False)
        try:
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        except TypeError:  # tf_keras (and old overrides): no `training` argument
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
    grads = tape.gradient(loss, model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    flat = np.concatenate([np.asarray(tf.convert_to_tensor(g), dtype=np.float64).ravel() for g in grads])
    return float(np.asarray(loss, dtype=np.float64)), flat


def final_logs(model, data, result, counts):
    """Loss and compiled metrics at the final weights (Keras's own test step on all the data), plus counts."""
    model.reset_metrics()
    logs = {name: float(np.asarray(value)) for name, value in model.test_step(data).items()}
    if getattr(result, "nit", None) is not None:
        logs["nit"] = int(result.nit)
    logs.update(counts)
    return logs


def minimize_on(model, data, method, maxiter, bounds, options, cache, verbose=0):
    """One scipy.optimize.minimize run on `data`, starting from the model's weights; returns the epoch's logs."""
    counts = {"nfev": 0, "njev": 0}
    best = {"f": np.inf, "x": None}

    def fun(x):
        counts["nfev"] += 1
        counts["njev"] += 1
        x = np.asarray(x, dtype=np.float64)
        key = x.tobytes()
        if key not in cache:  # BUG (a): the cache is shared across fits and never cleared when the data changes
            set_flat_weights(model, x)
            cache[key] = loss_and_grad(model, data)
        f, g = cache[key]
        if np.isfinite(f) and f < best["f"]:
            best["f"], best["x"] = f, x.copy()
        return f, g.copy()

    x0 = get_flat_weights(model)
    options = dict(options)
    if maxiter is not None:
        options["maxfun" if method == "TNC" else "maxiter"] = maxiter
    scipy_bounds = None
    if bounds is not None:
        scipy_bounds = optimize.Bounds(np.full(x0.size, bounds[0]), np.full(x0.size, bounds[1]))
    try:
        result = optimize.minimize(fun, x0, jac=True, method=method, bounds=scipy_bounds, options=options)
    except BaseException:
        if best["x"] is not None:
            set_flat_weights(model, best["x"])
        raise
    set_flat_weights(model, result.x)
    logs = final_logs(model, data, result, counts)
    if verbose:
        print(f"cached_style {method}: {result.message} loss={logs.get('loss')} nfev={counts['nfev']}")
    return logs


def count_step(model):
    """tf_keras counts the steps run in model._train_counter (its progress bar reads it); Keras 3 has none."""
    counter = getattr(model, "_train_counter", None)
    if counter is not None:
        counter.assign_add(1)


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return a train function for model.train_function: one scipy run per epoch (epochs told apart by iterator)."""
    _refusals.require_compiled(model)
    if isinstance(method, str) and method.lower() in _SCIPY_METHODS and method.lower() not in map(str.lower, METHODS):
        raise ValueError(f"Method {method!r} is not offered by cached_style (gradient methods with jac=True only); "
                         "supported: " + ", ".join(METHODS))
    lowered = _refusals.canonical_method(method, METHODS)
    method = next(name for name in METHODS if name.lower() == lowered)
    maxiter = _refusals.require_maxiter(maxiter)
    bounds = options.pop("bounds", None)
    _refusals.require_bounds_allowed(method, bounds, BOUNDED)
    if bounds is not None:
        bounds = _refusals.bound_pair(bounds)
    _refusals.require_full_precision(model)
    _refusals.require_deterministic(model)
    unpack = keras_module(model).utils.unpack_x_y_sample_weight
    cache = {}  # BUG (a): one cache for the life of the train function
    state = {"iterator": None, "logs": None, "exhausted": False}

    def train_function(iterator):
        if iterator is state["iterator"]:  # BUG (b): "same iterator" taken to mean "same epoch"
            if state["exhausted"]:  # size unknown to Keras: StopIteration ends the epoch
                raise StopIteration
        else:
            history = getattr(model, "history", None)
            steps = (getattr(history, "params", None) or {}).get("steps")
            batches, exhausted = drain(iterator, steps, unpack)
            data = stack(batches)
            _refusals.require_data(*data)
            _refusals.require_deterministic(model)
            _refusals.require_embedding_ids(model, data[0])
            if not model.built or not model.trainable_variables:
                model(data[0], training=False)
            _refusals.require_full_precision(model)
            logs = minimize_on(model, data, method, maxiter, bounds, options, cache, verbose)
            state.update(iterator=iterator, exhausted=exhausted, logs=logs)
        count_step(model)
        return state["logs"]

    return train_function
