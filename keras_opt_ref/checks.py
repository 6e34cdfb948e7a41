"""Refuse bad input before any work, with a message that names the problem and the fix."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from . import _keras

__all__ = ["check_data", "check_model", "check_trainable"]

_LOW_PRECISION = ("float16", "bfloat16")


def check_model(model: Any, *, deterministic: bool = False) -> None:
    """Checks that need only the model: compiled, precision, stochastic layers."""
    if not _keras.is_compiled(model):
        raise RuntimeError(
            "The model is not compiled: call model.compile(loss=...) before "
            "make_train_function (compile() also resets model.train_function)."
        )
    for layer in _keras.iter_layers(model):
        policy = getattr(layer, "dtype_policy", None)
        names = {str(getattr(policy, "compute_dtype", "")), str(getattr(policy, "variable_dtype", ""))}
        if names & set(_LOW_PRECISION):
            raise TypeError(
                f"Layer {layer.name!r} uses dtype policy {getattr(policy, 'name', policy)!r}: "
                "float16/bfloat16 and mixed precision are refused, because scipy's line "
                "searches and finite-difference-grade derivatives need float32 or float64. "
                "Build the model with dtype 'float32' or 'float64' "
                "(keras.mixed_precision.set_global_policy('float32'))."
            )
    stochastic = [
        layer.name
        for layer in _keras.iter_layers(model)
        if type(layer).__name__ in _keras.STOCHASTIC_LAYERS and _is_active(layer)
    ]
    if stochastic and not deterministic:
        raise ValueError(
            f"The model has stochastic layers {stochastic}: scipy's line searches need a "
            "deterministic objective, and these layers draw new random numbers on every "
            "call in training mode. Remove them, or pass deterministic=True to evaluate "
            "the objective in inference mode (as model.evaluate does: dropout and noise off)."
        )
    if any(type(layer).__name__ == "BatchNormalization" for layer in _keras.iter_layers(model)):
        warnings.warn(
            "BatchNormalization runs in inference mode in the full-batch objective (moving "
            "statistics, as in model.evaluate); only its gamma/beta are optimized.",
            UserWarning,
            stacklevel=3,
        )


def _is_active(layer: Any) -> bool:
    for attr in ("rate", "stddev", "factor"):
        value = getattr(layer, attr, None)
        if value is not None:
            try:
                return bool(np.any(np.asarray(value, dtype=float) != 0))
            except (TypeError, ValueError):
                return True
    return True


def check_trainable(model: Any) -> None:
    if not model.trainable_variables:
        raise ValueError(
            "The model has no trainable weights: there is nothing for scipy to optimize. "
            "Check layer.trainable / model.trainable, or build the model with trainable layers."
        )
    low = [
        _keras.variable_name(v)
        for v in model.trainable_variables
        if tf.as_dtype(v.dtype).name in _LOW_PRECISION
    ]
    if low:
        raise TypeError(
            f"Trainable variables {low} are float16/bfloat16; use float32 or float64 weights."
        )


def check_data(data: tuple[Any, Any, Any]) -> int:
    """Validate ``(x, y, sample_weight)`` held as tensors; return the number of samples."""
    parts = (("inputs", data[0]), ("targets", data[1]), ("sample weights", data[2]))
    leaves = [
        (what, path, t)
        for what, part in parts
        for path, t in _leaves_with_paths(part)
    ]
    if not any(what == "inputs" for what, _, _ in leaves):
        raise ValueError("No input data: fit/objective got x=None. Pass the training inputs.")
    sizes = {(what, path): int(t.shape[0]) if t.shape.rank else 1 for what, path, t in leaves}
    n = next(iter(sizes.values()))
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{w}{p}: {s}" for (w, p), s in sizes.items())
        raise ValueError(f"Inputs, targets and sample weights disagree on the number of samples ({detail}).")
    if n == 0:
        raise ValueError(
            "The training data is empty (0 samples): pass at least one sample to fit."
        )
    for what, path, t in leaves:
        if t.dtype.is_floating or t.dtype.is_complex:
            finite = tf.math.is_finite(tf.cast(t, tf.float64) if t.dtype.is_complex else t)
            bad = int(tf.size(finite)) - int(tf.math.count_nonzero(finite))
            if bad:
                raise ValueError(
                    f"The {what}{path} contain {bad} NaN/Inf value(s): the full-batch loss "
                    "would be NaN. Clean or impute them before calling fit."
                )
    return n


def _leaves_with_paths(structure: Any) -> list[tuple[str, tf.Tensor]]:
    if structure is None:
        return []
    out = []
    for path, leaf in _flatten_with_paths(structure, ""):
        if leaf is not None:
            out.append((path, leaf))
    return out


def _flatten_with_paths(structure: Any, prefix: str):
    if isinstance(structure, dict):
        for key in sorted(structure):
            yield from _flatten_with_paths(structure[key], f"{prefix}[{key!r}]")
    elif isinstance(structure, (list, tuple)):
        for i, item in enumerate(structure):
            yield from _flatten_with_paths(item, f"{prefix}[{i}]")
    else:
        yield prefix, structure
