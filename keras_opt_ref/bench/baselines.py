"""What users would use instead of the reference, for the benchmarks to measure against.

- :class:`HandWrittenLinear`, :class:`HandWrittenFactorization`: the mean squared error and its
  analytic gradient in NumPy / ``scipy.sparse`` -- the lower bound a careful user could write
  by hand for these two workloads, with no Keras or TensorFlow in the loop.
- :class:`PerBatchLoop`: the full-batch loss and gradient computed the way the earlier
  keras-opt implementations do it, a Python loop over mini-batches calling a compiled per-batch
  gradient (here made exact: each batch weighted by its size).
- :func:`adam_trace`: plain Keras mini-batch Adam, with the full-batch loss recorded against
  training seconds (evaluation time excluded).

Each hand-written objective takes and returns float64 vectors in the model's own layout (the
order of ``model.trainable_variables``), so the same ``x`` means the same weights.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import scipy.sparse
import tensorflow as tf

from ..backends.tensorflow.flat import GraphFlatVariables as FlatVariables
from ..backends.tensorflow.flat import tf_variable
from ..base import keras_compat as _keras
from .workloads import FactorizationData

__all__ = ["HandWrittenFactorization", "HandWrittenLinear", "PerBatchLoop", "adam_trace"]


class HandWrittenLinear:
    """``mean((X @ w + b - y)**2)`` and its gradient for a ``Dense(1)`` model."""

    def __init__(self, X: np.ndarray, y: np.ndarray, *, use_bias: bool = True) -> None:
        self.X = np.asarray(X, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.float64).reshape(-1)
        self.use_bias = use_bias
        self.size = self.X.shape[1] + int(use_bias)  # layout: kernel (d, 1), then bias (1,)

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        d = self.X.shape[1]
        r = self.X @ x[:d] - self.y
        if self.use_bias:
            r += x[d]
        n = r.size
        grad = np.empty_like(x)
        grad[:d] = (2.0 / n) * (self.X.T @ r)
        if self.use_bias:
            grad[d] = (2.0 / n) * r.sum()
        return float(r @ r) / n, grad


class HandWrittenFactorization:
    """Mean squared error of ``U[u] . V[i] (+ bu[u] + bi[i])`` over the observed ratings.

    The gradient scatters rows back with sparse indicator matrices (``A_u.T @ rows``), the
    usual hand-written way. ``flat`` gives the model's layout; the tables are found in it by
    shape, so users and items must differ in number.
    """

    def __init__(self, data: FactorizationData, flat: FlatVariables) -> None:
        self.u = data.users.reshape(-1)
        self.i = data.items.reshape(-1)
        self.y = data.ratings.reshape(-1).astype(np.float64)
        n = self.y.size
        ones = np.ones(n)
        self.users_t = scipy.sparse.csr_matrix((ones, (self.u, np.arange(n))), shape=(data.n_users, n))
        self.items_t = scipy.sparse.csr_matrix((ones, (self.i, np.arange(n))), shape=(data.n_items, n))
        if data.n_users == data.n_items:
            raise ValueError("HandWrittenFactorization finds the tables by shape: use n_users != n_items")
        self.flat = flat
        self.size = flat.size
        self.slots = {}
        for k, shape in enumerate(flat.shapes):
            rows, width = int(shape[0]), int(shape[1])
            table = "users" if rows == data.n_users else "items"
            self.slots[(table, "bias" if width == 1 else "factors")] = (flat.slice(k), (rows, width))

    def _table(self, x: np.ndarray, table: str, kind: str) -> np.ndarray | None:
        slot = self.slots.get((table, kind))
        return None if slot is None else x[slot[0]].reshape(slot[1])

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        U, V = self._table(x, "users", "factors"), self._table(x, "items", "factors")
        Uu, Vi = U[self.u], V[self.i]
        r = np.einsum("nk,nk->n", Uu, Vi) - self.y
        bu, bi = self._table(x, "users", "bias"), self._table(x, "items", "bias")
        if bu is not None:
            r += bu[self.u, 0] + bi[self.i, 0]
        scale = 2.0 / r.size
        grad = np.empty_like(x)
        grad[self.slots[("users", "factors")][0]] = (scale * (self.users_t @ (r[:, None] * Vi))).ravel()
        grad[self.slots[("items", "factors")][0]] = (scale * (self.items_t @ (r[:, None] * Uu))).ravel()
        if bu is not None:
            grad[self.slots[("users", "bias")][0]] = scale * (self.users_t @ r)
            grad[self.slots[("items", "bias")][0]] = scale * (self.items_t @ r)
        return float(r @ r) / r.size, grad


class PerBatchLoop:
    """Full-batch loss and gradient as a Python loop over mini-batches (exact weighting).

    One compiled per-batch value-and-gradient call per batch, summed in NumPy with weight
    ``n_batch / N``: the evaluation strategy of the earlier keras-opt implementations,
    corrected so that it computes the same objective as the reference.
    """

    def __init__(self, model: Any, x: Any, y: Any, *, batch_size: int = 32, jit_compile: bool = False) -> None:
        self.model = model
        self.flat = FlatVariables.from_variables(model.trainable_variables)
        self.size = self.flat.size
        self.batch_size = int(batch_size)
        self.x, self.y = x, y
        self.n = len(tf.nest.flatten(y)[0])
        tf_vars = [tf_variable(v) for v in self.flat.variables]

        @tf.function(jit_compile=jit_compile, reduce_retracing=True)
        def batch_value_and_grad(xb, yb):
            with tf.GradientTape() as tape:
                loss = model.compute_loss(x=xb, y=yb, y_pred=model(xb, training=False))
            return tf.cast(loss, tf.float64), self.flat.concat(tape.gradient(loss, tf_vars))

        self._batch_fn = batch_value_and_grad

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        self.flat.write(x)
        total, grad = 0.0, np.zeros(self.size)
        for start in range(0, self.n, self.batch_size):
            batch = tf.nest.map_structure(lambda t, s=start: t[s : s + self.batch_size], (self.x, self.y))
            weight = len(tf.nest.flatten(batch[1])[0]) / self.n
            f, g = self._batch_fn(*batch)
            total += weight * float(f)
            grad += weight * g.numpy()
        return total, grad


def adam_trace(
    model: Any,
    x: Any,
    y: Any,
    full_batch_loss: Any,
    *,
    seconds: float,
    batch_size: int = 256,
    learning_rate: float = 1e-2,
    max_epochs: int = 100_000,
) -> np.ndarray:
    """Train ``model`` with mini-batch Adam for about ``seconds`` of training time.

    ``full_batch_loss()`` is called after every epoch (its time is not counted). Returns an
    array of rows ``(training seconds, full-batch loss)``, starting with the initial loss at 0.
    """
    keras = _keras.keras_module(model)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss="mse")
    rows = [(0.0, full_batch_loss())]

    class Clock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.trained = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.trained += time.perf_counter() - self.started
            loss = full_batch_loss()
            rows.append((self.trained, loss))
            if self.trained >= seconds or not math.isfinite(loss):
                self.model.stop_training = True

    model.fit(x, y, batch_size=batch_size, epochs=max_epochs, shuffle=True, verbose=0, callbacks=[Clock()])
    return np.array(rows)
