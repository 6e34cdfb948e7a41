"""What runs inside the TensorFlow objective's compiled functions.

Each function sets the variables from its own ``x``, then sums a chunk function over the held
chunks in a sequential ``tf.while_loop`` (memory bounded by a chunk), each chunk's loss weighted
by its share of Keras's reduction (``base.checks.chunk_rule``). Derivatives are exact: gradients
by ``tf.GradientTape`` (embeddings as ``IndexedSlices``), HVPs reverse-over-reverse (or
forward-over-reverse with ``tf.autodiff.ForwardAccumulator``), the dense Hessian one HVP per unit
vector, the trust-ncg subproblem in ``steihaug``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from . import steihaug

__all__ = ["ChunkGraphs"]


def _map_data(fn: Callable[[Any], Any], data: Any) -> Any:
    """Apply ``fn`` to every tensor of a data structure, keeping ``None`` (no y, no weights)."""
    return tf.nest.map_structure(lambda t: None if t is None else fn(t), data)


class ChunkGraphs:
    """The graph side of :class:`~keras_opt_ref.backends.tensorflow.objective.TensorFlowObjective`:
    reads ``model``, ``flat``, ``rule``, ``hvp_mode``, the chunk variables ``_chunks`` (head, tail),
    their row count ``_chunk_rows`` and shares ``_weights``, and ``_tf_vars``."""

    def _loss(self, batch: tuple[Any, Any, Any] | None) -> tf.Tensor:
        """Inside a graph: Keras's loss on a batch; ``None``: the weight regularizers alone."""
        if batch is None:
            return tf.add_n([tf.cast(loss, tf.float64) for loss in self.model.losses])
        x, y, sample_weight = batch
        y_pred = self.model(x, training=False)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        return tf.cast(loss, tf.float64)

    def _assign(self, x: tf.Tensor) -> None:
        for var, value in zip(self._tf_vars, self.flat.split(x), strict=True):
            var.assign(value)

    def _over_chunks(self, chunk_fn: Callable[[Any, Any], tuple]) -> tuple:
        """Sum ``chunk_fn(chunk, share)`` over all chunks (sequentially, memory-bounded).

        The shares follow ``self.rule``; where they do not sum to one (rule ``"sum"``), the
        weight regularizers, which every chunk's loss contains, are taken out ``k - 1`` times.
        """
        head, tail = self._chunks
        head_share, tail_share = self._shares()
        total = chunk_fn(_map_data(tf.convert_to_tensor, tail), tail_share) if self._weights[1] else None
        if head is not None:
            count = int(tf.nest.flatten(head)[0].shape[0])

            def chunk(i):
                return _map_data(lambda v: tf.gather(v, i), head)

            def body(i, acc):
                return i + 1, tuple(a + b for a, b in zip(acc, chunk_fn(chunk(i), head_share(i)), strict=True))

            if total is None:  # no tail: start from the first chunk
                start, acc = 1, chunk_fn(chunk(0), head_share(0))
            else:
                start, acc = 0, tuple(tf.zeros_like(t) for t in total)
            _, acc = tf.while_loop(lambda i, _: i < count, body, (tf.constant(start), acc), parallel_iterations=1)
            total = acc if total is None else tuple(a + b for a, b in zip(acc, total, strict=True))
        if self.rule == "sum":
            chunks = (0 if head is None else count) + (1 if self._weights[1] else 0)
            if chunks > 1 and self.model.losses:
                extra = chunk_fn(None, 1.0 - chunks)  # a chunk of no data: the regularizers alone
                total = tuple(a + b for a, b in zip(total, extra, strict=True))
        return total

    def _shares(self) -> tuple[Callable[[Any], Any], Any]:
        """Inside a graph: head chunk ``i``'s share of the loss (a function of ``i``) and the tail's."""
        if self.rule != "sample_weight":
            return (lambda i: self._weights[0]), self._weights[1]
        head, tail = self._chunks
        tail_sum = tf.reduce_sum(tf.cast(tf.nest.flatten(tail[2])[0], tf.float64))
        if head is None:
            return (lambda i: 1.0), tf.math.divide_no_nan(tail_sum, tail_sum)
        per_chunk = tf.cast(tf.nest.flatten(head[2])[0], tf.float64)
        per_chunk = tf.reduce_sum(tf.reshape(per_chunk, [per_chunk.shape[0], -1]), axis=1)
        total = tf.reduce_sum(per_chunk) + tail_sum
        return (lambda i: tf.math.divide_no_nan(tf.gather(per_chunk, i), total)), tf.math.divide_no_nan(tail_sum, total)

    def _rows(self, start: tf.Tensor, size: int) -> Any:
        """Inside a graph: rows ``[start, start + size)`` of the data, gathered from the chunk
        variables (row ``i`` is head chunk ``i // c``, row ``i % c``, or tail row ``i - full c``)
        without assembling the whole training set."""
        head, tail = self._chunks
        idx = start + tf.range(size)
        if head is None:
            return _map_data(lambda t: tf.gather(t, idx), tail)
        c = self._chunk_rows
        in_head = int(tf.nest.flatten(head)[0].shape[0]) * c
        at = tf.minimum(idx, in_head - 1)
        at = tf.stack([at // c, at % c], axis=1)
        from_tail = tf.maximum(idx - in_head, 0)

        def pick(h, t):
            rows = tf.gather_nd(tf.convert_to_tensor(h), at)  # a read, not a copy; XLA has no ResourceGatherNd
            if t.shape[0] == 0:
                return rows
            mask = tf.reshape(idx < in_head, [size] + [1] * (rows.shape.rank - 1))
            return tf.where(mask, rows, tf.gather(t, from_tail))

        return tf.nest.map_structure(lambda h, t: None if t is None else pick(h, t), head, tail)

    def _chunk_value(self, chunk: Any, weight: float) -> tuple:
        return (weight * self._loss(chunk),)

    def _chunk_grads(self, chunk: Any, weight: float) -> tuple[tf.Tensor, list[Any]]:
        """Weighted chunk loss and its gradient per variable (embeddings as ``IndexedSlices``)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._tf_vars)
            loss = weight * self._loss(chunk)
        return loss, tape.gradient(loss, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _chunk_value_and_grad(self, chunk: Any, weight: float) -> tuple:
        loss, grads = self._chunk_grads(chunk, weight)
        return loss, self.flat.concat(grads)

    def _chunk_hvp(self, chunk: Any, weight: float, p: tf.Tensor) -> tuple:
        if self.hvp_mode == "forward-over-reverse":
            with tf.autodiff.ForwardAccumulator(self._tf_vars, self.flat.split(p)) as acc:
                _, grad = self._chunk_value_and_grad(chunk, weight)
            return (acc.jvp(grad, unconnected_gradients=tf.UnconnectedGradients.ZERO),)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self._tf_vars)
            _, grads = self._chunk_grads(chunk, weight)
            grad_dot_p = _dot(grads, self.flat.split(p))
        hp = outer.gradient(grad_dot_p, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (self.flat.concat(hp),)

    def _graph_value(self, x):
        self.traces["value"] += 1
        self._assign(x)
        return self._over_chunks(self._chunk_value)[0]

    def _graph_value_and_grad(self, x):
        self.traces["value_and_grad"] += 1
        self._assign(x)
        loss, grad = self._over_chunks(self._chunk_value_and_grad)
        return tf.concat([tf.reshape(loss, [1]), grad], 0)

    def _hvp_at_current_weights(self, p):
        return self._over_chunks(lambda chunk, w: self._chunk_hvp(chunk, w, p))

    def _graph_hvp(self, x, p):
        self.traces["hvp"] += 1
        self._assign(x)
        return self._hvp_at_current_weights(p)[0]

    def _hvp_operator(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """Inside a graph, at the current weights: ``p -> H p`` in float64. With one chunk, the
        forward and backward passes are recorded once and each product is one more backward
        pass over them (a linearization, 0.65x a fresh HVP); with several chunks, each product
        runs over the chunks again (memory bounded by a chunk)."""
        head, tail = self._chunks
        if head is not None:
            return lambda p: self._hvp_at_current_weights(tf.cast(p, self.flat.common_dtype))[0]
        with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
            tape.watch(self._tf_vars)
            _, grads = self._chunk_grads(_map_data(tf.convert_to_tensor, tail), self._shares()[1])
            grads = [tf.convert_to_tensor(g) for g in grads]  # embeddings: densified on the tape

        def hvp(p):
            directions = self.flat.split(tf.cast(p, self.flat.common_dtype))
            hp = tape.gradient(grads, self._tf_vars, output_gradients=directions,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.cast(self.flat.concat(hp), tf.float64)

        return hvp

    def _graph_steihaug(self, x, f, g, radius):
        self.traces["steihaug"] += 1
        self._assign(x)
        return steihaug.solve(self._hvp_operator(), f, g, radius)

    def _graph_hessian(self, x):
        # One HVP per unit vector in a sequential loop: memory stays at one HVP plus H.
        self.traces["hessian"] += 1
        self._assign(x)
        n = self.flat.size
        rows = tf.map_fn(
            lambda e: self._hvp_at_current_weights(e)[0],
            tf.eye(n, dtype=tf.float64),
            parallel_iterations=1,
            fn_output_signature=tf.float64,
        )
        return 0.5 * (rows + tf.transpose(rows))


def _dot(grads: list[Any], directions: list[tf.Tensor]) -> tf.Tensor:
    """Inside a graph: sum of <g_i, p_i> in float64. Embedding gradients (``IndexedSlices``) are
    not densified: their rows meet the gathered rows of p (repeated indices count each time,
    as in the dense sum), which keeps the second backward pass sparse too (1.45x instead of
    1.8x a gradient on the factorization)."""
    terms = []
    for g, p in zip(grads, directions, strict=True):
        if isinstance(g, tf.IndexedSlices):
            g, p = g.values, tf.gather(p, g.indices)
        terms.append(tf.reduce_sum(tf.cast(g, tf.float64) * tf.cast(p, tf.float64)))
    return tf.add_n(terms)
