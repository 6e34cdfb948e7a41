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

The data lives on the model's device, cut into chunks of ``chunk_size`` rows (``base.data.Chunks``); a
Python loop walks them, each chunk's loss weighted by its share (``base.checks.chunk_rule``) and summed
in float64. Eager torch throughout: ``torch.compile`` of a chunk's loss cost ~50 s of compilation
for 1.3x faster values and gradients on the mlp workload, moved them by float32 rounding, and
refuses the double backward of the HVP, so ``jit_compile`` is accepted and not used.

float64 models compute in torch's float64, except where Keras 3 itself demotes: its
``result_type`` maps float64 to float32 on this backend, so ``ops.matmul`` (Dense) and
``ops.mean`` (the built-in losses) run in float32 (keras-team/keras#23704). The objective is then
Keras's loss as Keras computes it, derivatives exact for that computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...base import checks, keras_compat, nest
from ...base.data import Chunks
from ...base.objective import Objective, weight_regularization

__all__ = ["TorchObjective"]


class TorchObjective(Objective):
    """Keras's full-batch loss on the torch backend; parameters as :class:`~keras_opt_ref.base.objective.Objective`
    (``jit_compile`` is accepted and not used: eager torch, see the module docstring;
    ``hvp_mode=None`` is reverse-over-reverse)."""

    backend = "torch"
    computes_float64 = False  # Keras 3.15 demotes float64 to float32 in many ops here (base.objective)

    def _setup(self) -> None:
        self.jit_compile = False  # measured not to pay (module docstring)
        self._dtype = self.flat.common_dtype
        self._torch_dtype = _torch_dtype(self._dtype)
        self._device = self.model.trainable_variables[0].value.device

    # ------------------------------------------------------------------ data
    def _backend_tensor(self, leaf: Any) -> Any:
        import keras  # its default device: where the model's variables live

        return keras.ops.convert_to_tensor(leaf)

    def _loss_facts(self, data: tuple[Any, Any, Any]) -> checks.LossFacts:
        import keras  # its default device: where the model's variables live

        return checks.loss_facts_eagerly(self.model, data, self.chunk_size, keras.ops.convert_to_tensor)

    def _hold(self, data: tuple[Any, Any, Any], rows: int) -> None:
        """Hold the training set on the model's device, in chunks."""
        chunks = Chunks(data, rows, self.rule)
        self._numpy_data = data

        def to_device(tree: Any) -> Any:
            return nest.map_data(self._tensor, tree)

        # (batch, share) per chunk; a batch of None is rule "sum"'s regularizer correction.
        head = to_device(chunks.head)
        self._pieces = [(nest.map_data(lambda t, i=i: t[i], head), float(share))
                        for i, share in enumerate(chunks.head_shares)]
        if chunks.has_tail:
            self._pieces.append((to_device(chunks.tail), chunks.tail_share))
        if chunks.extra_regularizers and any(getattr(v, "regularizer", None) for v in self.flat.variables):
            self._pieces.append((None, chunks.extra_regularizers))
        self._state = ([v.value.detach().clone() for v in self.model.non_trainable_variables],
                       [v.value.detach().clone() for v in self.model.metrics_variables])

    @property
    def data(self) -> tuple[Any, Any, Any]:
        """The training set ``(x, y, sample_weight)`` as NumPy arrays."""
        return self._numpy_data

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(array), device=self._device)

    # ------------------------------------------------------ the backend's part (base.objective.Objective)
    def _compute_value(self, x: np.ndarray) -> float:
        with torch.no_grad():
            w = self._leaf(x, grad=False)
            return float(sum(self._piece_loss(w, piece) for piece in self._pieces))

    def _device_vector(self, x: np.ndarray) -> torch.Tensor:
        return self._leaf(x)

    def _value_and_grad_call(self, w: torch.Tensor) -> torch.Tensor:
        # Summed on the device in float64: one host sync per evaluation (_to_host), not two per chunk.
        out = torch.zeros(1 + self.size, dtype=torch.float64, device=self._device)
        for piece in self._pieces:  # one chunk's graph at a time
            loss = self._piece_loss(w, piece)
            out[0] += loss.detach()
            out[1:] += _grad(loss, w).detach()
        return out

    def _to_host(self, out: torch.Tensor) -> np.ndarray:
        return _numpy(out)

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
        return [w[self.flat.slice(i)].reshape(shape).to(_torch_dtype(dtype))
                for i, (shape, dtype) in enumerate(zip(self.flat.shapes, self.flat.dtypes, strict=True))]

    def _piece_loss(self, w: torch.Tensor, piece: tuple[Any, float]) -> torch.Tensor:
        """One chunk's Keras loss at ``w`` times its share, in float64 (as ``compute_loss_and_updates``
        of Keras's JAX trainer computes it); a batch of ``None``: rule "sum"'s regularizer correction."""
        batch, share = piece
        trainable = self._split(w)
        if batch is None:  # each chunk's loss held the weight regularizers; count them once
            return share * torch.as_tensor(weight_regularization(self.flat, trainable)).double()
        non_trainable, metrics = self._state
        return share * keras_compat.stateless_loss(self.model, trainable, non_trainable, metrics, batch).double()

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
