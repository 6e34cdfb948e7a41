"""The full-batch objective on Keras 3's JAX backend (``KERAS_BACKEND=jax``).

``f(x)`` is the loss Keras's JAX trainer differentiates (``model.compute_loss_and_updates``:
compiled loss, regularizers and ``add_loss`` terms) in inference mode, over all samples, with
the trainable variables taken from the flat vector ``x`` -- as ``model.evaluate`` reports it.
Everything is stateless: the weights enter as arguments, never through the model's variables.

- value and gradient: one ``jax.jit`` of ``jax.value_and_grad``;
- HVP: forward-over-reverse ``jax.jvp`` of the gradient (``hvp_mode="reverse-over-reverse"``:
  the gradient of ``<grad, p>``);
- dense Hessian: ``jax.lax.map`` of the HVP over the unit vectors (memory: one HVP plus ``H``).

The data lives on the device, cut into chunks of ``chunk_size`` rows (``base.data.Chunks``); a
``jax.lax.scan`` walks them, so memory is bounded by a chunk, and each chunk's loss is weighted
by its share (``base.checks.chunk_rule``). Data and weights are arguments of the jitted functions,
so a new epoch's data of the same shapes reuses the compiled code.

float64 models need ``jax.config.update("jax_enable_x64", True)``; without it JAX would silently
compute in float32, so they are refused. With float32 models the sum over chunks is float32
unless x64 is on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ...base import checks
from ...base.data import Chunks
from ...base.objective import Objective, weight_regularization

__all__ = ["JaxObjective"]


class JaxObjective(Objective):
    """Keras's full-batch loss on the JAX backend; parameters as :class:`~keras_opt_ref.base.objective.Objective`
    (``jit_compile=False`` runs the functions without ``jax.jit``; ``hvp_mode=None`` is
    forward-over-reverse, JAX's own way: both are exact)."""

    backend = "jax"
    computes_float64 = False  # Keras 3.15 demotes float64 to float32 in many ops here (base.objective)
    default_hvp_mode = "forward-over-reverse"

    def _setup(self) -> None:
        wide = [n for n, d in zip(self.flat.names, self.flat.dtypes, strict=True) if d.itemsize == 8]
        if wide and not jax.config.jax_enable_x64:
            raise TypeError(
                f"Variables {wide} are float64, but JAX computes in float32 unless 64-bit mode is on, silently. "
                "Enable it before building the model: jax.config.update('jax_enable_x64', True), or build the "
                "model in float32."
            )
        self._dtype = self.flat.common_dtype
        self._acc_dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        self._build_functions()

    # ------------------------------------------------------------------ data
    def _backend_tensor(self, leaf: Any) -> Any:
        return jnp.asarray(leaf)

    def _loss_facts(self, data: tuple[Any, Any, Any]) -> checks.LossFacts:
        return checks.loss_facts_eagerly(self.model, data, self.chunk_size, jnp.asarray)

    def _hold(self, data: tuple[Any, Any, Any], rows: int) -> None:
        """Hold the training set on the device, in chunks (same shapes reuse the compiled code)."""
        chunks = Chunks(data, rows, self.rule)
        self._numpy_data = data
        to_device = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
        self._data = (to_device(chunks.head), to_device(chunks.tail),
                      jnp.asarray(chunks.head_shares, self._acc_dtype),
                      jnp.asarray(chunks.tail_share, self._acc_dtype),
                      jnp.asarray(chunks.extra_regularizers, self._acc_dtype))
        self._has_tail, self._extra = chunks.has_tail, chunks.extra_regularizers != 0
        # Read now: during fit the train function has put the state back into the variables.
        self._state = ([v.value for v in self.model.non_trainable_variables],
                       [v.value for v in self.model.metrics_variables])

    @property
    def data(self) -> tuple[Any, Any, Any]:
        """The training set ``(x, y, sample_weight)`` as NumPy arrays."""
        return self._numpy_data

    # ------------------------------------------------------ the backend's part (base.objective.Objective)
    def _compute_value(self, x: np.ndarray) -> float:
        return float(self._functions["value"](self._device_vector(x), self._state, self._data))

    def _value_and_grad_call(self, w: Any) -> jax.Array:
        return self._functions["value_and_grad"](w, self._state, self._data).block_until_ready()

    def _to_host(self, out: jax.Array) -> np.ndarray:
        return np.asarray(out, np.float64)

    def _compute_hvp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        out = self._functions["hvp"](self._device_vector(x), self._device_vector(p), self._state, self._data)
        return np.asarray(out, np.float64)

    def _compute_hessian(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._functions["hessian"](self._device_vector(x), self._state, self._data), np.float64)

    def _device_vector(self, x: np.ndarray) -> Any:
        # NumPy goes to the jitted functions as it is: their C++ dispatch moves it to the device 0.08-0.14 ms
        # faster than jnp.asarray would first (mlp- and factorization-medium, docs/measurements.md).
        x = x.astype(self._dtype, copy=False)
        return x if self.jit_compile else jnp.asarray(x)

    # ------------------------------------------------------------- functions
    def _build_functions(self) -> None:
        wrap = jax.jit if self.jit_compile else (lambda f: f)
        self._functions = {name: wrap(getattr(self, f"_fn_{name}")) for name in ("value", "value_and_grad", "hvp")}
        self._functions["hessian"] = wrap(self._fn_hessian)

    def _split(self, w: jax.Array) -> list[jax.Array]:
        return [w[self.flat.slice(i)].reshape(shape).astype(dtype)
                for i, (shape, dtype) in enumerate(zip(self.flat.shapes, self.flat.dtypes, strict=True))]

    def _chunk_loss(self, trainable: list, state: tuple, batch: tuple) -> jax.Array:
        non_trainable, metrics = state
        x, y, sample_weight = batch
        loss, _ = self.model.compute_loss_and_updates(
            trainable, non_trainable, metrics, x, y, sample_weight, training=False)
        return loss.astype(self._acc_dtype)

    def _loss(self, w: jax.Array, state: tuple, data: tuple) -> jax.Array:
        """Keras's one-batch loss at ``w``: the weighted chunk losses, walked by a scan."""
        head, tail, head_shares, tail_share, extra = data
        trainable = self._split(w)
        total = jnp.zeros((), self._acc_dtype)
        if self._has_tail:
            total = total + tail_share * self._chunk_loss(trainable, state, tail)
        if head is not None:
            def step(acc, chunk_and_share):
                chunk, share = chunk_and_share
                return acc + share * self._chunk_loss(trainable, state, chunk), None

            total, _ = jax.lax.scan(step, total, (head, head_shares))
        if self._extra:  # rule "sum": each chunk's loss held the weight regularizers; count them once
            total = total + extra * weight_regularization(self.flat, trainable).astype(self._acc_dtype)
        return total

    def _fn_value(self, w, state, data):
        return self._loss(w, state, data)

    def _fn_value_and_grad(self, w, state, data):
        f, g = jax.value_and_grad(self._loss)(w, state, data)
        return jnp.concatenate([f.reshape(1).astype(self._acc_dtype), g.astype(self._acc_dtype)])

    def _fn_hvp(self, w, p, state, data):
        grad = lambda v: jax.grad(self._loss)(v, state, data)  # noqa: E731
        if self.hvp_mode == "reverse-over-reverse":
            return jax.grad(lambda v: jnp.vdot(grad(v), p))(w).astype(self._acc_dtype)
        return jax.jvp(grad, (w,), (p,))[1].astype(self._acc_dtype)

    def _fn_hessian(self, w, state, data):
        eye = jnp.eye(w.shape[0], dtype=w.dtype)
        rows = jax.lax.map(lambda e: self._fn_hvp(w, e, state, data), eye)
        return 0.5 * (rows + rows.T)
