"""The full-batch objective on Keras 3's PyTorch backend (``KERAS_BACKEND=torch``).

``f(x)`` is the loss Keras's trainers compute (``model.stateless_call``, then
``model.stateless_compute_loss``: compiled loss, regularizers and ``add_loss`` terms) in inference
mode, over all samples, with the trainable variables taken from the flat vector ``x`` -- as
``model.evaluate`` reports it. Everything is stateless: the weights enter as one leaf tensor built
from ``x``, never through the model's variables.

- value: the chunk losses under ``torch.no_grad``;
- gradient: ``torch.autograd.grad`` of each chunk's loss (memory: one chunk's graph);
- HVP: double backward, the vector-Jacobian product of the gradient built with ``create_graph``
  (``hvp_mode="forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, exact too but
  measured 1.6x slower on the mlp workload);
- dense Hessian: one HVP per unit vector, each chunk's gradient graph built once and reused
  (memory: one chunk's graph plus ``H``).

The data lives on the model's device, cut into chunks of ``chunk_size`` rows (``core.Chunks``); a
Python loop walks them, each chunk's loss weighted by its share (``checks.chunk_rule``) and summed
in float64. Eager torch throughout: ``torch.compile`` of a chunk's loss cost ~50 s of compilation
for 1.3x faster values and gradients on the mlp workload, moved them by float32 rounding, and
refuses the double backward of the HVP, so ``jit_compile`` is accepted and not used.

float64 models compute in torch's float64, except where Keras 3 itself demotes: its
``result_type`` maps float64 to float32 on this backend, so ``ops.matmul`` (Dense) and
``ops.mean`` (the built-in losses) run in float32 (keras-team/keras#23704). The objective is then
Keras's loss as Keras computes it, derivatives exact for that computation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import torch

from . import checks, methods
from .core import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_HESSIAN_PARAMS,
    Chunks,
    Objective,
    eager_facts,
    numpy_data,
    weight_regularization,
)
from .flat import FlatVariables

__all__ = ["TorchObjective"]


class TorchObjective(Objective):
    """Keras's full-batch loss on the torch backend; parameters as ``objective.FullBatchObjective``
    (``jit_compile`` is accepted and not used: eager torch, see the module docstring;
    ``hvp_mode=None`` is reverse-over-reverse)."""

    backend = "torch"

    def __init__(
        self,
        model: Any,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        jit_compile: bool | None = None,
        hvp_mode: str | None = None,
        max_hessian_params: int = DEFAULT_MAX_HESSIAN_PARAMS,
        deterministic: bool = False,
        max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    ) -> None:
        settings = methods.check_settings(
            chunk_size=chunk_size, jit_compile=jit_compile, hvp_mode=hvp_mode, max_hessian_params=max_hessian_params,
            deterministic=deterministic, max_data_bytes=max_data_bytes,
        )
        checks.check_model(model, deterministic=deterministic)
        checks.check_trainable(model)
        self.model = model
        self.chunk_size = settings["chunk_size"]
        self.max_data_bytes = settings["max_data_bytes"]
        self.hvp_mode = settings["hvp_mode"]
        self.max_hessian_params = settings["max_hessian_params"]
        self.jit_compile = False  # measured not to pay (module docstring)
        self.flat = FlatVariables.from_variables(model.trainable_variables)
        self._dtype = self.flat.common_dtype.as_numpy_dtype
        self._torch_dtype = _torch_dtype(self._dtype)
        self._device = model.trainable_variables[0].value.device
        self.set_data(x, y, sample_weight)
        self.reset_counters()

    # ------------------------------------------------------------------ data
    def set_data(self, x: Any, y: Any = None, sample_weight: Any = None) -> None:
        """Hold a new training set on the model's device (validated; the same functions serve any data)."""
        data = checks.as_tensors((x, y, sample_weight), self.max_data_bytes)
        self.num_samples = n = checks.check_data(data)
        data = numpy_data(data)
        self.facts = eager_facts(self.model, data, self.chunk_size, self._tensor)
        self.rule, why = checks.chunk_rule(self.model, self.facts, data[2])
        rows = self.chunk_size
        if n > rows and not self.rule:
            warnings.warn(
                f"All {n} samples are evaluated in one piece, not in chunks of chunk_size={rows}: {why}, so chunk "
                "values do not add up to Keras's loss. Memory is not bounded by chunk_size here.",
                UserWarning,
                stacklevel=3,
            )
            rows = n
        self.rule = self.rule or "rows"
        chunks = Chunks(data, rows, self.rule)
        self._numpy_data = data

        def to_device(tree: Any) -> Any:
            return tf.nest.map_structure(lambda t: None if t is None else self._tensor(t), tree)

        # (batch, share) per chunk; a batch of None is rule "sum"'s regularizer correction.
        head = to_device(chunks.head)
        self._pieces = [(tf.nest.map_structure(lambda t, i=i: None if t is None else t[i], head), float(share))
                        for i, share in enumerate(chunks.head_shares)]
        if chunks.has_tail:
            self._pieces.append((to_device(chunks.tail), chunks.tail_share))
        if chunks.extra_regularizers and any(getattr(v, "regularizer", None) for v in self.flat.variables):
            self._pieces.append((None, chunks.extra_regularizers))
        self._state = ([v.value.detach().clone() for v in self.model.non_trainable_variables],
                       [v.value.detach().clone() for v in self.model.metrics_variables])
        self.forget()

    @property
    def data(self) -> tuple[Any, Any, Any]:
        """The training set ``(x, y, sample_weight)`` as NumPy arrays."""
        return self._numpy_data

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(array), device=self._device)

    # ------------------------------------------------------ the backend's part (core.Objective)
    def _compute_value(self, x: np.ndarray) -> float:
        with torch.no_grad():
            w = self._leaf(x, grad=False)
            return float(sum(self._piece_loss(w, piece) for piece in self._pieces))

    def _compute_value_and_grad(self, x: np.ndarray) -> np.ndarray:
        w = self._leaf(x)
        out = np.zeros(1 + self.size)
        for piece in self._pieces:  # one chunk's graph at a time
            loss = self._piece_loss(w, piece)
            out[0] += float(loss.detach())
            out[1:] += _numpy(_grad(loss, w))
        return out

    def _compute_hvp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        p = self._leaf(p, grad=False)
        return self._hvps(x, 1, lambda _: p)[0]

    def _compute_hessian(self, x: np.ndarray) -> np.ndarray:
        def unit(i: int) -> torch.Tensor:
            e = torch.zeros(self.size, dtype=self._torch_dtype, device=self._device)
            e[i] = 1
            return e

        rows = self._hvps(x, self.size, unit)
        rows += rows.T  # numpy buffers the overlapping transpose
        rows *= 0.5
        return rows

    # ------------------------------------------------------------- functions
    def _leaf(self, x: np.ndarray, grad: bool = True) -> torch.Tensor:
        """``x`` in the variables' common dtype on the model's device: the leaf every evaluation starts from."""
        return torch.from_numpy(x.astype(self._dtype)).to(self._device).requires_grad_(grad)

    def _split(self, w: torch.Tensor) -> list[torch.Tensor]:
        return [w[self.flat.slice(i)].reshape(shape).to(_torch_dtype(dtype.as_numpy_dtype))
                for i, (shape, dtype) in enumerate(zip(self.flat.shapes, self.flat.dtypes, strict=True))]

    def _piece_loss(self, w: torch.Tensor, piece: tuple[Any, float]) -> torch.Tensor:
        """One chunk's Keras loss at ``w`` times its share, in float64 (as ``compute_loss_and_updates``
        of Keras's JAX trainer computes it); a batch of ``None``: rule "sum"'s regularizer correction."""
        batch, share = piece
        trainable = self._split(w)
        if batch is None:  # each chunk's loss held the weight regularizers; count them once
            return share * torch.as_tensor(weight_regularization(self.flat, trainable)).double()
        model, (non_trainable, metrics) = self.model, self._state
        x, y, sample_weight = batch
        kwargs = {"training": False} if model._call_has_training_arg else {}
        y_pred, _, losses = model.stateless_call(trainable, non_trainable, x, return_losses=True, **kwargs)
        if losses:  # the forward pass's add_loss terms, made visible to compute_loss as Keras's trainers do
            model._losses_override.clear()
            model._losses_override = losses
        try:
            loss, _ = model.stateless_compute_loss(
                trainable, non_trainable, metrics, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        finally:
            model._losses_override.clear()
        return share * loss.double()

    def _hvps(self, x: np.ndarray, count: int, vector: Callable[[int], torch.Tensor]) -> np.ndarray:
        """``H(x) @ vector(i)`` for ``i < count`` as the rows of a float64 array, chunk by chunk:
        reverse-over-reverse builds each chunk's gradient graph once and reuses it for every vector."""
        w = self._leaf(x)
        out = np.zeros((count, self.size))
        for piece in self._pieces:
            if self.hvp_mode == "forward-over-reverse":
                grad = torch.func.grad(lambda v, piece=piece: self._piece_loss(v, piece))
                for i in range(count):
                    out[i] += _numpy(torch.func.jvp(grad, (w.detach(),), (vector(i),))[1])
                continue
            g = _grad(self._piece_loss(w, piece), w, create_graph=True)
            if not g.requires_grad:  # the piece is linear in w: no curvature
                continue
            for i in range(count):
                out[i] += _numpy(_grad(g, w, vector(i), retain_graph=i + 1 < count))
        return out


def _grad(output: torch.Tensor, w: torch.Tensor, vector: Any = None, **kwargs: Any) -> torch.Tensor:
    """d(output)/dw (times ``vector``: a vector-Jacobian product); zeros where ``output`` does not use ``w``."""
    return torch.autograd.grad(output, w, vector, allow_unused=True, materialize_grads=True, **kwargs)[0]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _torch_dtype(dtype: Any) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype
