"""The one place that knows which Keras a model comes from.

Serves Keras 3 (>= 3.0, TensorFlow backend) and legacy tf-keras 2.x (``tf_keras``,
selected in TensorFlow with ``TF_USE_LEGACY_KERAS=1``). Everything else in the package
asks this module instead of touching either Keras directly, so a Keras change is
mended here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

__all__ = [
    "STOCHASTIC_LAYERS",
    "default_keras",
    "fit_steps_per_epoch",
    "steps_per_execution",
    "flavour",
    "is_compiled",
    "is_mean_squared_error",
    "iter_layers",
    "keras_module",
    "tf_variable",
    "unpack_x_y_sample_weight",
    "variable_name",
    "variable_regularizers",
]

# Layers whose training-mode output is random. The objective is evaluated in
# inference mode, where they are the identity, so their presence must be
# acknowledged explicitly (``deterministic=True``) instead of silently ignored.
STOCHASTIC_LAYERS = frozenset(
    {
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "RandomFlip",
        "RandomRotation",
        "RandomZoom",
        "RandomTranslation",
        "RandomContrast",
        "RandomBrightness",
        "RandomCrop",
    }
)


def default_keras():
    """The Keras TensorFlow itself would use: tf-keras when ``TF_USE_LEGACY_KERAS`` is set."""
    legacy = os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes")
    return importlib.import_module("tf_keras" if legacy else "keras")


def flavour(model: Any) -> str:
    """Return ``"keras3"`` or ``"tf_keras"`` for a model, from its class hierarchy."""
    for cls in type(model).__mro__:
        module = cls.__module__
        if module.startswith("tf_keras"):
            return "tf_keras"
        if module.startswith("keras"):
            return "keras3"
    raise TypeError(
        f"{type(model).__name__} is neither a Keras 3 nor a tf-keras model; "
        "pass a keras.Model (or tf_keras.Model)."
    )


def keras_module(model: Any):
    """The ``keras`` or ``tf_keras`` module a model belongs to."""
    return importlib.import_module("tf_keras" if flavour(model) == "tf_keras" else "keras")


def is_compiled(model: Any) -> bool:
    if flavour(model) == "tf_keras":
        return bool(getattr(model, "_is_compiled", False))
    return bool(getattr(model, "compiled", False))


def tf_variable(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras variable (Keras 3 wraps one; tf-keras is one)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"cannot find the tf.Variable behind {variable!r}")


def variable_name(variable: Any) -> str:
    """A readable unique-ish name: Keras 3 ``path`` or tf-keras ``name`` without ``:0``."""
    path = getattr(variable, "path", None)
    if isinstance(path, str):
        return path
    return variable.name.split(":")[0]


def fit_steps_per_epoch(model: Any) -> int | None:
    """Batches per epoch of the running ``fit`` (``None`` if unknown, e.g. a generator).

    Both Keras flavours point ``model.history`` at the fit's History callback when fit
    starts and give it ``params["steps"]``. tf-keras feeds arrays from one iterator over
    a repeated dataset, so this count is the only way to know where an epoch ends.
    """
    params = getattr(getattr(model, "history", None), "params", None) or {}
    steps = params.get("steps")
    return int(steps) if steps else None


def steps_per_execution(model: Any) -> int:
    """Batches Keras feeds per train_function call (Keras 3 attribute; tf-keras variable)."""
    spe = getattr(model, "steps_per_execution", None)
    if spe is None:
        spe = getattr(model, "_steps_per_execution", None)
    if hasattr(spe, "numpy"):
        spe = spe.numpy()
    return max(1, int(spe or 1))


def unpack_x_y_sample_weight(model: Any, data: Any) -> tuple[Any, Any, Any]:
    return keras_module(model).utils.unpack_x_y_sample_weight(data)


def iter_layers(layer: Any) -> Iterator[Any]:
    """Yield a layer and every layer nested inside it (models within models)."""
    yield layer
    for sub in getattr(layer, "layers", None) or ():
        if sub is not layer:
            yield from iter_layers(sub)


_MSE_NAMES = frozenset({"mse", "mean_squared_error", "meansquarederror"})


def is_mean_squared_error(loss: Any) -> bool:
    """Whether a compiled loss (name, function or Loss object) is the mean squared error with
    Keras's default reduction (the mean over all elements of the batch)."""
    if isinstance(loss, str):
        return loss.lower() in _MSE_NAMES
    names = {getattr(loss, "__name__", ""), type(loss).__name__, getattr(getattr(loss, "fn", None), "__name__", "")}
    if not any(n.lower() in _MSE_NAMES for n in names if n):
        return False
    return str(getattr(loss, "reduction", None) or "auto") in ("auto", "sum_over_batch_size")


def variable_regularizers(model: Any) -> tuple[dict[int, Any], list[str]]:
    """Weight regularizers by ``id`` of the variable, and the layers with activity regularizers.

    Keras 3 keeps a weight's regularizer on the variable; tf-keras keeps it on the layer as
    ``<weight>_regularizer`` (``kernel_regularizer`` for ``layer.kernel``).
    """
    found: dict[int, Any] = {}
    if flavour(model) == "keras3":
        found = {id(v): v.regularizer for v in model.trainable_variables if getattr(v, "regularizer", None)}
    activity = []
    for layer in iter_layers(model):
        if getattr(layer, "activity_regularizer", None) is not None:
            activity.append(layer.name)
        if flavour(model) == "tf_keras":
            for attr, regularizer in list(vars(layer).items()):
                if attr.endswith("_regularizer") and attr != "activity_regularizer" and regularizer is not None:
                    weight = getattr(layer, attr[: -len("_regularizer")], None)
                    if weight is not None:
                        found[id(weight)] = regularizer
    return found, activity
