"""Bad-input validation shared by the independent implementations (validation only, no optimization code).

Every check raises before any scipy work, with a message that names the problem and the fix.
Works with Keras 3 models and tf-keras models alike (only duck typing and class names are used).
"""

import numbers

import numpy as np
import tensorflow as tf

_STOCHASTIC_CLASSES = {
    "Dropout": "rate",
    "SpatialDropout1D": "rate",
    "SpatialDropout2D": "rate",
    "SpatialDropout3D": "rate",
    "GaussianDropout": "rate",
    "AlphaDropout": "rate",
    "GaussianNoise": "stddev",
}
_LOW_PRECISION = ("float16", "bfloat16")


def _class_names(obj):
    return [klass.__name__ for klass in type(obj).__mro__]


def all_layers(model):
    """Every layer of the model, nested models and RNN cells included."""
    flatten = getattr(model, "_flatten_layers", None)
    if callable(flatten):
        layers = list(flatten(include_self=True, recursive=True))
    else:
        layers, stack = [], [model]
        while stack:
            layer = stack.pop()
            layers.append(layer)
            stack.extend(getattr(layer, "layers", []) or [])
    extra = []
    for layer in layers:
        for attr in ("cell", "forward_layer", "backward_layer"):
            sub = getattr(layer, attr, None)
            if sub is not None and hasattr(sub, "trainable_weights"):
                extra.append(sub)
    return layers + [e for e in extra if all(e is not layer for layer in layers)]


def require_compiled(model):
    compiled = getattr(model, "compiled", None)
    if compiled is None:
        compiled = getattr(model, "_is_compiled", False)
    if not compiled:
        raise ValueError(
            "The model is not compiled: call model.compile(loss=...) before make_train_function "
            "(the loss to minimize comes from compile)."
        )


def canonical_method(method, valid_names):
    """`valid_names` are display names (e.g. "Nelder-Mead"); returns the lower-case name."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string naming a solver, got {method!r}; valid methods: "
                        + ", ".join(valid_names))
    lowered = method.lower()
    if lowered not in {name.lower() for name in valid_names}:
        raise ValueError(f"Unknown method {method!r}. Valid methods (case-insensitive): " + ", ".join(valid_names))
    return lowered


def require_maxiter(maxiter):
    if maxiter is None:
        return None
    if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral):
        raise TypeError(f"maxiter must be a non-negative integer or None, got {maxiter!r}; pass e.g. maxiter=100.")
    if maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer or None, got {maxiter}; pass e.g. maxiter=100.")
    return int(maxiter)


def require_bounds_allowed(method, bounds, bounded_methods):
    if bounds is None:
        return
    if method.lower() not in {m.lower() for m in bounded_methods}:
        raise ValueError(
            f"Method {method!r} does not take bounds, so bounds={bounds!r} would be ignored: use one of "
            + ", ".join(bounded_methods) + " or drop bounds=."
        )


def bound_pair(pair, what="bounds"):
    """Validate one (lo, hi) pair; None means unbounded. Returns floats (+-inf for None)."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{what} must be one (lo, hi) pair, got {pair!r}; e.g. bounds=(0, None).")
    values = []
    for value, default in zip(pair, (-np.inf, np.inf), strict=False):
        if value is None:
            values.append(default)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and not np.isnan(value):
            values.append(float(value))
        else:
            raise ValueError(f"{what} entries must be numbers or None, got {pair!r}.")
    if values[0] > values[1]:
        raise ValueError(f"{what} has lo > hi: {pair!r}; give (lo, hi) with lo <= hi.")
    return values[0], values[1]


def require_deterministic(model):
    for layer in all_layers(model):
        names = _class_names(layer)
        for klass, attr in _STOCHASTIC_CLASSES.items():
            if klass in names and float(getattr(layer, attr, 1.0) or 0.0) > 0.0:
                raise ValueError(
                    f"Layer {layer.name!r} ({type(layer).__name__}, {attr}={getattr(layer, attr)}) is stochastic: "
                    "a deterministic full-batch objective cannot include it. Remove the layer or set its "
                    f"{attr} to 0 before optimizing with scipy."
                )
        if any(name.startswith("Random") and name != "RandomFourierFeatures" for name in names[:1]):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) is a random augmentation layer (stochastic): "
                "remove it from the model (augment the data beforehand) before optimizing with scipy."
            )
        for attr in ("dropout", "recurrent_dropout"):
            value = getattr(layer, attr, 0.0)
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0:
                raise ValueError(
                    f"Layer {layer.name!r} ({type(layer).__name__}) has {attr}={value}, which is stochastic: "
                    f"set {attr}=0 before optimizing with scipy."
                )


def require_full_precision(model):
    for layer in all_layers(model):
        policy = getattr(layer, "dtype_policy", None)
        policy_name = str(getattr(policy, "name", policy) or "")
        compute = str(getattr(layer, "compute_dtype", "") or "")
        variable = str(getattr(layer, "variable_dtype", "") or "")
        if any(low in text for low in _LOW_PRECISION for text in (policy_name, compute, variable)):
            raise ValueError(
                f"Layer {layer.name!r} uses dtype policy {policy_name or compute!r}: float16/bfloat16/mixed "
                "precision is not supported (scipy needs float32 or float64 objectives). Rebuild the model "
                "with keras.config.set_dtype_policy('float32') (or 'float64')."
            )
    for variable in model.weights:
        if any(low in str(variable.dtype) for low in _LOW_PRECISION):
            raise ValueError(
                f"Weight {variable.name!r} has dtype {variable.dtype}: float16/bfloat16 weights are not supported; "
                "rebuild the model in float32 or float64."
            )


def _leaves(structure):
    return [leaf for leaf in tf.nest.flatten(structure) if leaf is not None]


def count_samples(x):
    leaves = _leaves(x)
    if not leaves:
        return 0
    return int(np.shape(leaves[0])[0]) if np.ndim(leaves[0]) else 1


def require_data(x, y, sample_weight):
    """Non-empty, finite inputs, targets and sample weights."""
    if count_samples(x) == 0:
        raise ValueError(
            "The training data is empty (0 samples reached the train function): pass at least one sample "
            "to fit (check the dataset / generator / steps_per_epoch)."
        )
    for what, structure in (("inputs (x)", x), ("targets (y)", y), ("sample weights", sample_weight)):
        for leaf in _leaves(structure):
            array = np.asarray(leaf)
            if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
                bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                raise ValueError(
                    f"The {what} contain {bad} NaN or Inf value(s): the objective would be NaN. "
                    f"Clean or impute the {what} before calling fit."
                )


def require_nonnegative_weights(sample_weight):
    """Least squares takes square roots of the sample weights."""
    for leaf in _leaves(sample_weight):
        if np.any(np.asarray(leaf) < 0):
            raise ValueError("The sample weights contain negative values, which least squares (lm/trf/dogbox) "
                             "cannot express as residuals: pass non-negative sample weights or use a minimize method.")


class _BadIds(Exception):
    pass


def require_embedding_ids(model, x):
    """One inference pass with each Embedding's call spied on, to check ids are in [0, input_dim)."""
    embeddings = [layer for layer in all_layers(model) if "Embedding" in _class_names(layer)
                  and hasattr(layer, "input_dim")]
    if not embeddings:
        return
    problems = []

    def make_spy(layer, original):
        def spy(inputs, *args, **kwargs):
            ids = np.asarray(inputs)
            if ids.size:
                low, high = ids.min(), ids.max()
                if low < 0 or high >= layer.input_dim:
                    problems.append((layer, low, high))
                    raise _BadIds()
            return original(inputs, *args, **kwargs)
        return spy

    for layer in embeddings:
        layer.call = make_spy(layer, layer.call)
    try:
        model(x, training=False)
    except Exception:
        if not problems:
            raise
    finally:
        for layer in embeddings:
            try:
                del layer.call
            except AttributeError:
                pass
    if problems:
        layer, low, high = problems[0]
        raise ValueError(
            f"Embedding layer {layer.name!r} received ids outside [0, {layer.input_dim}) (min {low}, max {high}): "
            "remap the ids into range or enlarge input_dim."
        )
