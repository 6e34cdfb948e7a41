"""The one place that knows which Keras a model comes from.

Serves Keras 3 (>= 3.0, on TensorFlow, JAX or torch) and legacy tf-keras 2.x (``tf_keras``,
selected in TensorFlow with ``TF_USE_LEGACY_KERAS=1``). Everything else in the package asks this
module instead of touching Keras's private attributes, so a Keras change is mended here. It
imports no framework: what it needs of one comes through Keras.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from . import nest

__all__ = [
    "STOCHASTIC_LAYERS",
    "add_loss_count",
    "batch_level_losses",
    "calling_model",
    "calling_fit",
    "chief_only_writer",
    "default_keras",
    "fit_steps_per_epoch",
    "flavour",
    "has_compiled_metrics",
    "is_builtin_loss",
    "is_compiled",
    "is_mean_squared_error",
    "iter_layers",
    "keep_counts_integer",
    "keras_module",
    "loss_leaves",
    "loss_reduction",
    "numpy_batches",
    "on_compile",
    "output_mask",
    "overrides_compute_loss",
    "per_sample_values",
    "steps_per_execution",
    "stateless_loss",
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
        package = cls.__module__.split(".")[0]  # a user's module named keras_models.py is neither
        if package == "tf_keras":
            return "tf_keras"
        if package == "keras":
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


# ------------------------------------------------------------------ the compiled loss
def loss_leaves(model: Any) -> list[Any]:
    """The losses given to ``compile`` (names, functions or Loss objects), one per output that has one.

    Both flavours keep the user's argument as ``model.loss``.
    """
    loss = getattr(model, "loss", None)
    if isinstance(loss, Mapping):
        leaves = list(loss.values())
    elif isinstance(loss, (list, tuple)):
        leaves = list(loss)
    else:
        leaves = [loss]
    return [leaf for leaf in leaves if leaf is not None]


def loss_reduction(loss: Any) -> str:
    """How a compiled loss reduces its per-sample values: ``"sum_over_batch_size"`` (the mean over
    all values; tf-keras's ``"auto"`` and Keras 3's ``"mean"`` are the same), ``"sum"``,
    ``"mean_with_sample_weight"`` (Keras 3) or ``"none"``. Names and plain functions are wrapped
    by Keras with the default."""
    if isinstance(loss, str) or not hasattr(loss, "reduction"):
        return "sum_over_batch_size"
    reduction = loss.reduction
    reduction = "none" if reduction is None else str(getattr(reduction, "value", reduction)).lower()
    return "sum_over_batch_size" if reduction in ("auto", "mean") else reduction


def is_builtin_loss(loss: Any) -> bool:
    """Whether a compiled loss is one of Keras's own, which return one value per sample."""
    if isinstance(loss, str):
        return True
    fn = getattr(loss, "fn", None) or loss  # a LossFunctionWrapper is as builtin as its function
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return module.startswith(("keras.", "tf_keras."))


def per_sample_values(model: Any, loss: Any, y_true: Any, y_pred: Any) -> Any:
    """A custom loss's unreduced values on a batch (``Loss.call``, or the function), with ``y_true``
    cast to a floating ``y_pred``'s dtype as Keras's loss wrappers do."""
    call = loss.call if hasattr(loss, "reduction") and hasattr(loss, "call") else loss
    dtype = getattr(y_pred, "dtype", None)
    if dtype is not None and getattr(dtype, "is_floating", "float" in str(getattr(dtype, "name", dtype))):
        module = keras_module(model)
        cast = module.ops.cast if flavour(model) == "keras3" else module.backend.cast
        y_true = cast(y_true, dtype)
    return call(y_true, y_pred)


def batch_level_losses(model: Any, y: Any, outputs: list[Any]) -> list[str]:
    """Inside the data check: the custom compiled losses not seen to return one value per sample
    (one that reduces over the batch itself does not add up over chunks)."""
    customs = [loss for loss in loss_leaves(model) if not is_builtin_loss(loss)]
    targets = nest.flatten(y)
    if len(customs) == 1 and len(outputs) == 1 and len(targets) == 1:
        try:
            values = per_sample_values(model, customs[0], targets[0], outputs[0])
            if len(values.shape) and values.shape[0] == outputs[0].shape[0]:
                return []
        except Exception:  # noqa: BLE001 -- any failure means: not known to be per sample
            pass
    return [getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__ for loss in customs]


def has_compiled_metrics(model: Any) -> bool:
    """Whether ``compile`` was given ``metrics`` or ``weighted_metrics``. Keras 3 keeps the arguments
    in ``_compile_config`` (its public ``get_compile_config`` serializes them, which loads TensorFlow
    where it is installed, whatever the backend); tf-keras's ``get_compile_config`` is cheap."""
    config = getattr(getattr(model, "_compile_config", None), "config", None)
    if not isinstance(config, Mapping):
        config = model.get_compile_config() or {}
    return bool(config.get("metrics") or config.get("weighted_metrics"))


def overrides_compute_loss(model: Any) -> bool:
    """Whether the model's class replaces ``Model.compute_loss`` (its terms are then unknown)."""
    return type(model).compute_loss is not keras_module(model).Model.compute_loss


def output_mask(tensor: Any) -> Any:
    """The Keras mask a layer attached to an output tensor (both flavours use ``_keras_mask``)."""
    return getattr(tensor, "_keras_mask", None)


def add_loss_count(model: Any) -> int:
    """Right after ``model(x)`` inside a trace: how many ``add_loss`` terms that call added
    (activity regularizers included). Both flavours keep them in each layer's ``_losses``; weight
    regularizers are kept apart (Keras 3: on the variables; tf-keras: ``_callable_losses``)."""
    return sum(len(getattr(layer, "_losses", ()) or ()) for layer in iter_layers(model))


# ------------------------------------------------------------------ fit's plumbing
def calling_model(depth: int = 2) -> Any:
    """The Keras model whose ``fit``/``train_on_batch`` called the train function, or None.

    Both flavours call ``self.train_function(iterator)`` from inside the model's own method, so
    the caller's frame holds the model as ``self``.
    """
    frame = sys._getframe(depth)
    owner = frame.f_locals.get("self") if frame is not None else None
    try:
        flavour(owner)
    except TypeError:
        return None
    return owner if hasattr(owner, "train_function") else None


def calling_fit(depth: int = 2) -> tuple[int, Any]:
    """``(verbose, callbacks)`` of the ``fit`` that called the train function: its verbosity
    (``"auto"`` is 1) and its CallbackList; ``(0, None)`` when no ``fit`` called it.

    Read from the same frame as :func:`calling_model`: ``fit`` keeps both as locals in both
    flavours and holds no attribute for either."""
    frame = sys._getframe(depth)
    if frame is None or frame.f_code.co_name != "fit":
        return 0, None
    verbose, callbacks = frame.f_locals.get("verbose", 0), frame.f_locals.get("callbacks")
    verbose = 1 if verbose == "auto" else verbose if isinstance(verbose, int) else 0
    return verbose, callbacks if isinstance(getattr(callbacks, "callbacks", None), list) else None


def chief_only_writer(callback: Any) -> bool:
    """Whether ``callback`` itself writes on the chief alone under a multi-worker strategy (tf-keras's
    ModelCheckpoint, TensorBoard and BackupAndRestore write elsewhere into a temporary directory they
    remove). Such a callback must run on every worker: tf-keras's weight saving takes part in the
    strategy's collectives, so a save on the chief alone stalls the workers' next evaluation."""
    return type(callback).__module__.split(".")[0] == "tf_keras" and type(callback).__name__ in (
        "ModelCheckpoint", "TensorBoard", "BackupAndRestore")


def on_train_end(model: Any, fit_callbacks: Any, hook: Callable[[], None]) -> None:
    """Call ``hook()`` when the ``fit`` owning ``fit_callbacks`` (a CallbackList) ends its training:
    a callback is appended to that list for this fit only (its ``on_train_end`` is fit's last event)."""
    base = keras_module(model).callbacks.Callback

    class _FitEnd(base):  # type: ignore[misc, valid-type]
        def on_train_end(self, logs: Any = None) -> None:
            hook()

    fit_callbacks.callbacks.append(_FitEnd())


def on_compile(model: Any, hook: Callable[[Any, Any], None]) -> None:
    """Call ``hook(model, train_function_before)`` after every later ``model.compile(...)``.

    ``compile()`` resets ``model.train_function`` in both flavours; there is no public event for
    it, so the model instance's ``compile`` is wrapped (once; the class is untouched).
    """
    if getattr(model, "_keras_opt_ref_compile_hook", False):
        return
    original = model.compile

    @functools.wraps(original)
    def compile(*args: Any, **kwargs: Any) -> Any:
        before = getattr(model, "train_function", None)
        out = original(*args, **kwargs)
        hook(model, before)
        return out

    object.__setattr__(model, "compile", compile)
    object.__setattr__(model, "_keras_opt_ref_compile_hook", True)


class _Counts(list):
    """A history list that keeps counts as ints: Keras 3's CallbackList turns every log value
    into a float (``keras.src.utils.python_utils.pythonify_logs``) before History appends it."""

    def append(self, value: Any) -> None:
        super().append(int(value) if float(value).is_integer() else value)


def keep_counts_integer(model: Any, logs: Mapping[str, Any], counts: tuple[str, ...]) -> None:
    """Make the running Keras 3 fit's History store the ``counts`` among ``logs`` as ints.

    The History's lists are created here in sorted key order, the order pythonify_logs gives
    them; tf-keras stores log values as they are.
    """
    history = getattr(getattr(model, "history", None), "history", None)
    if flavour(model) != "keras3" or not isinstance(history, dict):
        return
    for key in sorted(logs):
        if key in counts and not isinstance(history.get(key), _Counts):
            history[key] = _Counts(history.get(key, ()))
        else:
            history.setdefault(key, [])


# ------------------------------------------------------------------ JAX and torch (Keras 3)
def numpy_batches(batches: list[Any]) -> list[Any]:
    """JAX / torch batches (their arrays, or NumPy) as NumPy, for the backend-neutral data checks."""
    import keras

    return [nest.map_data(keras.ops.convert_to_numpy, b) for b in batches]


def stateless_loss(model: Any, trainable: list, non_trainable: list, metrics: list, batch: tuple) -> Any:
    """Keras 3's loss on ``batch`` at the given variable values, in inference mode, as its trainers
    compute it: ``stateless_call``, then ``stateless_compute_loss`` with the forward pass's
    ``add_loss`` terms made visible to it (Keras's torch trainer does the same through the private
    ``_losses_override``)."""
    x, y, sample_weight = batch
    kwargs = {"training": False} if model._call_has_training_arg else {}
    y_pred, _, losses = model.stateless_call(trainable, non_trainable, x, return_losses=True, **kwargs)
    if losses:
        model._losses_override.clear()
        model._losses_override = losses
    try:
        loss, _ = model.stateless_compute_loss(
            trainable, non_trainable, metrics, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
    finally:
        model._losses_override.clear()
    return loss
