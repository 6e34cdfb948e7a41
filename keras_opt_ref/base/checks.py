"""Refuse bad input before any work, with a message that names the problem and the fix.

The checks of the model (:func:`check_model`, :func:`check_trainable`), of what evaluating the
loss once on the data revealed about it
(:func:`check_loss_facts`, :func:`chunk_rule`, :func:`check_residual_model`) and, during a run,
whether a value handed to scipy is finite (:func:`non_finite`). The data's checks live in
``base.data``, the solver options' and bounds' in ``train.methods``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import keras_compat as _keras
from . import nest
from .flat import numpy_dtype

__all__ = [
    "LossFacts",
    "NotSquaredErrorError",
    "as_float",
    "check_declared_rule",
    "check_loss_facts",
    "check_model",
    "check_residual_model",
    "check_trainable",
    "chunk_rule",
    "loss_eagerly",
    "loss_facts_eagerly",
    "non_finite",
    "record",
    "summary",
]


class NotSquaredErrorError(ValueError):
    """The compiled loss cannot be written as a sum of squared residuals."""

_LOW_PRECISION = ("float16", "bfloat16")


def numpy_dtype_name(dtype: Any) -> str:
    """A dtype's name ("float32", "bfloat16"), whatever the framework (NumPy has no bfloat16)."""
    name = str(getattr(dtype, "name", dtype))
    return name if name in _LOW_PRECISION else numpy_dtype(dtype).name


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
        if numpy_dtype_name(v.dtype) in _LOW_PRECISION
    ]
    if low:
        raise TypeError(
            f"Trainable variables {low} are float16/bfloat16; use float32 or float64 weights."
        )


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


# A declared loss_over_rows and the chunk rule it stands for.
DECLARED_RULES = {"mean": "rows", "sum": "sum"}
_RULE_WORDS = {"rows": "a mean over rows (loss_over_rows='mean')", "sum": "a sum over rows (loss_over_rows='sum')",
               "sample_weight": "a mean weighted by the sample weights"}


def chunk_rule(model: Any, facts: LossFacts, sample_weight: Any, declared: str | None = None) -> tuple[str, str]:
    """How per-chunk values of Keras's loss add up to its one-batch value, exactly.

    Returns ``(rule, "")`` with rule ``"rows"`` (each chunk weighted by its share of the rows:
    means over all values), ``"sum"`` (chunks add up: reduction ``"sum"``) or ``"sample_weight"``
    (each chunk weighted by its share of the sample weights: ``"mean_with_sample_weight"``); or
    ``("", reason)`` when no such rule is exact, and the data must be evaluated in one piece.
    Weight regularizers do not depend on the data; the objective counts them once.

    ``declared`` (the setting ``loss_over_rows``) gives the rule where Keras's configuration does
    not show one; the objective then measures it (:func:`check_declared_rule`). Declaring a rule
    other than the one Keras's reduction shows is refused.
    """
    rule, why = _shown_rule(model, facts, sample_weight)
    if declared is None:
        return rule, why
    if rule and rule != DECLARED_RULES[declared]:
        raise ValueError(
            f"loss_over_rows={declared!r} contradicts the model's compiled loss, whose reduction adds up over chunks "
            f"as {_RULE_WORDS[rule]}. Leave loss_over_rows unset: here the rule is known from the model."
        )
    return DECLARED_RULES[declared], ""


def check_declared_rule(declared: str, whole: float, parts: tuple[float, float], rows: tuple[int, int],
                        regularization: float, dtype: str) -> None:
    """Refuse a declared ``loss_over_rows`` that does not add up: ``whole`` is the loss of the first
    ``rows[0] + rows[1]`` rows in one piece, ``parts`` the losses of its first ``rows[0]`` rows and of
    the rest, as the objective's chunks cut them, all at the starting weights. The parts combine as
    the objective combines chunks: by their share of the rows (``"mean"``), or added with the weight
    regularization (in every chunk's loss) counted once (``"sum"``)."""
    total = rows[0] + rows[1]
    if declared == "mean":
        combined = parts[0] * rows[0] / total + parts[1] * rows[1] / total
        how = f"{rows[0]}/{total} x {parts[0]:.9g} + {rows[1]}/{total} x {parts[1]:.9g}"
    else:
        combined = parts[0] + parts[1] - regularization
        how = f"{parts[0]:.9g} + {parts[1]:.9g}" + (f" - {regularization:.9g} (the weight regularization, counted "
                                                    "once)" if regularization else "")
    tol = 1e-9 if dtype == "float64" else 1e-4
    scale = max(abs(whole), abs(parts[0]), abs(parts[1]), np.finfo(np.float64).tiny)
    if not abs(combined - whole) <= tol * scale:
        other = "sum" if declared == "mean" else "mean"
        raise ValueError(
            f"loss_over_rows={declared!r} does not add up for this loss: on the first {total} rows at the starting "
            f"weights, the loss in one piece is {whole:.9g}, but its chunks of {rows[0]} and {rows[1]} rows combine "
            f"to {how} = {combined:.9g} (relative difference {abs(combined - whole) / scale:.2g}). Declare "
            f"loss_over_rows={other!r} if that describes the loss, or leave it unset: the loss is then evaluated in "
            "one piece (chunk_size does not bound its memory)."
        )


def _shown_rule(model: Any, facts: LossFacts, sample_weight: Any) -> tuple[str, str]:
    """:func:`chunk_rule` from what Keras's configuration and the traced loss show."""
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
    elif reduction == "mean_with_sample_weight" and len(nest.flatten(sample_weight)) == 1:
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


# ------------------------------------------------------------------ the loss, run eagerly once
def loss_facts_eagerly(model: Any, data: tuple[Any, Any, Any], rows: int, to_backend: Any) -> LossFacts:
    """Run the model and ``compute_loss`` eagerly on each chunk of ``rows`` (NumPy data, moved with
    ``to_backend``): surfaces data errors before any compiled work and records what the calls show
    about the loss. A non-finite loss at the start is refused (on JAX an out-of-range Embedding id
    gives NaN rather than an error)."""
    import keras

    facts = LossFacts()
    n = int(nest.leaves(data)[0].shape[0])
    for start in range(0, n, rows):
        try:
            y, y_pred, loss = _eager_loss(model, nest.map_data(lambda t, s=start: t[s : s + rows], data), to_backend)
            record(facts, model, y, y_pred)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise ValueError(
                f"The model cannot evaluate its training data ({summary(exc)}). Check the inputs' "
                "shapes, dtypes and index ranges (e.g. Embedding ids < input_dim)."
            ) from exc
        loss = keras.ops.convert_to_numpy(loss)
        facts.loss_shape = tuple(int(d) for d in np.shape(loss))
        check_loss_facts(facts)
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(
                f"The loss on samples [{start}, {min(start + rows, n)}) at the starting weights is {value}: the "
                "optimization cannot start. Check the data (Embedding ids must be < input_dim: out-of-range ids "
                "read NaN on this backend) and the starting weights."
            )
    return facts


def record(facts: LossFacts, model: Any, y: Any, y_pred: Any) -> None:
    """Right after ``y_pred = model(x)`` (eagerly, or inside a trace): what the call showed."""
    outputs = nest.flatten(y_pred)
    facts.add_losses = max(facts.add_losses, _keras.add_loss_count(model))
    facts.masked = facts.masked or any(_keras.output_mask(t) is not None for t in outputs)
    names = list(getattr(model, "output_names", None) or [])
    facts.output_names = sorted(y_pred) if isinstance(y_pred, dict) else (
        names if len(names) == len(outputs) else [str(i) for i in range(len(outputs))])
    facts.batch_level = _keras.batch_level_losses(model, y, outputs)


def loss_eagerly(model: Any, batch: tuple[Any, Any, Any], to_backend: Any) -> float:
    """Keras's loss on ``batch`` (NumPy data, moved with ``to_backend``) at the model's current weights,
    called eagerly (inference mode on Keras 3): the one-piece measure of a declared ``loss_over_rows``."""
    return as_float(_eager_loss(model, batch, to_backend)[2])


def _eager_loss(model: Any, batch: tuple[Any, Any, Any], to_backend: Any) -> tuple[Any, Any, Any]:
    """``(y, y_pred, loss)`` of one eager call of the model and ``compute_loss`` on a NumPy ``batch``."""
    x, y, sample_weight = nest.map_data(to_backend, batch)
    y_pred = model(x, training=False)
    mode = {"training": False} if _keras.flavour(model) == "keras3" else {}  # tf-keras: no such argument
    return y, y_pred, model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **mode)


def as_float(value: Any) -> float:
    """An eager scalar of any backend (a torch tensor may require grad) as a Python float."""
    return float(np.asarray(value.detach().cpu() if hasattr(value, "detach") else value))
