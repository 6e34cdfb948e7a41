"""Refuse bad input before any work, with a message that names the problem and the fix.

Every check of the package's inputs lives here (solver options and bounds: ``methods.py``):
the model (:func:`check_model`, :func:`check_trainable`), the data (:func:`as_tensors`,
:func:`check_data`, :func:`check_data_bytes`), what a traced evaluation revealed about the loss
(:func:`check_loss_facts`, :func:`chunk_rule`, :func:`check_residual_model`) and, during a run,
whether a value handed to scipy is finite (:func:`non_finite`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse
import tensorflow as tf

from . import _keras

__all__ = [
    "LossFacts",
    "NotSquaredErrorError",
    "as_tensors",
    "check_data",
    "check_data_bytes",
    "check_loss_facts",
    "check_model",
    "check_residual_model",
    "check_trainable",
    "chunk_rule",
    "dense_bytes",
    "non_finite",
    "summary",
]


class NotSquaredErrorError(ValueError):
    """The compiled loss cannot be written as a sum of squared residuals."""

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


# ------------------------------------------------------------------------ data as tensors
def as_tensors(data: tuple[Any, Any, Any], max_bytes: int) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` with every leaf a dense tensor, within ``max_bytes``.

    Sparse leaves (``tf.SparseTensor``, scipy.sparse) are densified: the model then computes the
    same values, and the size check below bounds the memory. Ragged tensors are refused (their
    rows have no exact dense form), as is anything ``tf.convert_to_tensor`` cannot take.
    """
    names = ("inputs", "targets", "sample weights")
    check_data_bytes(sum(dense_bytes(leaf) for part in data for leaf in tf.nest.flatten(part) if leaf is not None),
                     max_bytes)
    out = []
    for what, part in zip(names, data, strict=True):
        if part is None:
            out.append(None)
            continue
        paths = [path for path, _ in _flatten_with_paths(part, "")]
        leaves = [_dense(what, path, leaf) for path, leaf in zip(paths, tf.nest.flatten(part), strict=True)]
        out.append(tf.nest.pack_sequence_as(part, leaves))
    return tuple(out)


def _dense(what: str, path: str, leaf: Any) -> Any:
    if leaf is None:
        return None
    if isinstance(leaf, tf.RaggedTensor):
        raise ValueError(
            f"The {what}{path} are a tf.RaggedTensor: rows of different lengths have no exact dense form, so "
            "the full-batch loss is not defined here. Pad them (x.to_tensor()) and mask the padding "
            "(keras.layers.Masking, Embedding(mask_zero=True)), then pass the dense tensor."
        )
    if isinstance(leaf, tf.SparseTensor):
        return tf.sparse.to_dense(tf.sparse.reorder(leaf))
    if scipy.sparse.issparse(leaf):
        return tf.convert_to_tensor(leaf.toarray())
    try:
        return tf.convert_to_tensor(leaf)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"The {what}{path} ({type(leaf).__name__}) cannot be converted to a tensor ({summary(exc)}). "
            "Pass numeric arrays or tensors of one dtype and rectangular shape."
        ) from None


def dense_bytes(leaf: Any) -> int:
    """Bytes a data leaf takes as a dense tensor (what the objective holds)."""
    if isinstance(leaf, tf.RaggedTensor):
        return dense_bytes(leaf.flat_values)
    if isinstance(leaf, tf.SparseTensor):
        return int(np.prod(leaf.dense_shape.numpy(), dtype=np.int64)) * leaf.dtype.size
    if scipy.sparse.issparse(leaf):
        return int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize
    nbytes = getattr(leaf, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    if isinstance(leaf, tf.Tensor) and leaf.shape.is_fully_defined():
        return int(leaf.shape.num_elements()) * max(leaf.dtype.size, 1)
    return 0


def check_data_bytes(nbytes: int, max_bytes: int, *, drained: str = "") -> None:
    """Refuse a training set larger than ``max_bytes`` as dense tensors (``drained``: how far fit's
    data source had got, when the limit was passed while draining it)."""
    if nbytes > max_bytes:
        what = (f"fit's data source had yielded {_size(nbytes)} {drained}" if drained
                else f"The training data needs {_size(nbytes)} as dense tensors")
        raise ValueError(
            f"{what}, more than max_data_bytes={max_bytes} ({_size(max_bytes)}). Each epoch's data is held in "
            "memory at once: an endless generator needs steps_per_epoch=... (that many batches form an epoch); "
            "for a large finite data set, fit on less of it, or raise max_data_bytes if the memory is there."
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


# ------------------------------------------------------------- what the traced loss showed
@dataclass
class LossFacts:
    """What a traced forward pass and ``compute_loss`` on real data showed (see
    ``FullBatchObjective``): facts a model's configuration alone does not reveal."""

    masked: bool = False  # an output carries a Keras mask
    add_losses: int = 0  # add_loss terms (activity regularizers included) per call
    loss_shape: tuple[int | None, ...] = ()  # compute_loss's value: () unless reduction="none"
    batch_level: list[str] = field(default_factory=list)  # custom losses not known to return per-sample values
    output_names: list[str] = field(default_factory=list)  # outputs in tf.nest.flatten(y_pred) order


def check_loss_facts(facts: LossFacts) -> None:
    """The loss must be one number."""
    if facts.loss_shape != ():
        raise ValueError(
            f"model.compute_loss returns a tensor of shape {facts.loss_shape}, not one number: a loss compiled "
            "with reduction='none' (or a compute_loss that does not reduce). scipy minimizes a scalar; compile "
            "with reduction='sum_over_batch_size' (the default), 'sum' or 'mean_with_sample_weight'."
        )


_ROW_MEAN = "sum_over_batch_size"


def chunk_rule(model: Any, facts: LossFacts, sample_weight: Any) -> tuple[str, str]:
    """How per-chunk values of Keras's loss add up to its one-batch value, exactly.

    Returns ``(rule, "")`` with rule ``"rows"`` (each chunk weighted by its share of the rows:
    means over all values), ``"sum"`` (chunks add up: reduction ``"sum"``) or ``"sample_weight"``
    (each chunk weighted by its share of the sample weights: ``"mean_with_sample_weight"``); or
    ``("", reason)`` when no such rule is exact, and the data must be evaluated in one piece.
    Weight regularizers do not depend on the data; the objective counts them once.
    """
    if _keras.overrides_compute_loss(model):
        return "", f"{type(model).__name__} overrides compute_loss, whose terms are unknown here"
    if facts.masked:
        return "", "the model's outputs carry a Keras mask (the loss is a mean over the unmasked values only)"
    if facts.batch_level:
        return "", f"the custom loss(es) {facts.batch_level} may not return one value per sample"
    reductions = {_keras.loss_reduction(loss) for loss in _keras.loss_leaves(model)} or {_ROW_MEAN}
    if len(reductions) > 1:
        return "", f"the outputs' losses use different reductions {sorted(reductions)}"
    reduction = reductions.pop()
    weighted = sample_weight is not None
    if reduction == _ROW_MEAN or (reduction == "mean_with_sample_weight" and not weighted):
        rule = "rows"
    elif reduction == "sum":
        rule = "sum"
    elif reduction == "mean_with_sample_weight" and len(tf.nest.flatten(sample_weight)) == 1:
        rule = "sample_weight"
    else:
        return "", f"reduction={reduction!r} with per-output sample weights"
    _, activity = _keras.variable_regularizers(model)
    # Activity regularizers are per-row means in both flavours (Keras 3 divides by the batch size).
    if facts.add_losses > len(activity) or (facts.add_losses and rule != "rows"):
        return "", f"the model adds {facts.add_losses} add_loss term(s), which Keras computes per batch"
    return rule, ""


def check_residual_model(facts: LossFacts) -> None:
    """Least squares writes the loss as residuals: refuse what they cannot express."""
    if facts.add_losses:
        raise NotSquaredErrorError(
            f"The model adds {facts.add_losses} add_loss term(s) (add_loss or an activity regularizer), which "
            "least squares cannot write as residuals. Use a minimize method (L-BFGS-B, trust-ncg, ...), or move "
            "the term into the compiled loss."
        )
    if facts.masked:
        raise NotSquaredErrorError(
            "The model's outputs carry a Keras mask; the residuals here would count the masked values. Use a "
            "minimize method (L-BFGS-B, trust-ncg, ...), which evaluates Keras's masked loss."
        )


# ------------------------------------------------------------------------ during a run
def non_finite(value: Any) -> str:
    """``""`` if every entry of ``value`` is finite, else a description ("inf", "2 NaN of 10")."""
    array = np.asarray(value, dtype=np.float64)
    bad = ~np.isfinite(array)
    if not bad.any():
        return ""
    if array.ndim == 0:
        return str(float(array))
    kinds = sorted({"NaN" if math.isnan(v) else "Inf" for v in array[bad].ravel()[:1000]})
    return f"{int(bad.sum())} {'/'.join(kinds)} of {array.size} entries"


_NOISE = ("Exception encountered when calling", "Graph execution error", "Detected at node", 'File "', "[[")


def summary(exc: BaseException, limit: int = 400) -> str:
    """An error's message on one line: its detail kept; Keras's call banners and argument dumps,
    TensorFlow's trace of the user code and node names dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    # An error raised while tracing quotes the user's code first, then "SomeError: message".
    raised = list(re.finditer(r"^\s*(\w+(?:Error|Exception)): ", text, flags=re.MULTILINE))
    name = type(exc).__name__
    if raised:
        name, text = raised[-1].group(1), text[raised[-1].end():]
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Arguments received", "Call arguments received")):
            break
        if not line or line.startswith(_NOISE):
            continue
        line = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[\[\{\{node .*$|\s*\[Op:[^\]]*\]", "", line)
        if line:
            lines.append(line)
    line = " ".join(lines) or name
    return f"{name}: {line if len(line) <= limit else line[: limit - 3] + '...'}"
