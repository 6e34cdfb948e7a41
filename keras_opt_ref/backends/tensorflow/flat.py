"""The flat layout's TensorFlow side: the ``tf.Variable`` behind each Keras variable, and the
flat vector split into and joined from per-variable tensors inside a graph."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from ...base.flat import FlatVariables

__all__ = ["GraphFlatVariables", "tf_variable"]


def tf_variable(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras variable (Keras 3 wraps one; tf-keras is one)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"cannot find the tf.Variable behind {variable!r}")


class GraphFlatVariables(FlatVariables):
    """:class:`FlatVariables` with the graph side: ``split`` and ``concat`` inside a ``tf.function``."""

    def split(self, x: tf.Tensor) -> list[tf.Tensor]:
        """Inside a graph: split a flat vector into tensors shaped and typed like the variables."""
        return [
            tf.cast(tf.reshape(x[self.offsets[i] : self.offsets[i + 1]], shape), dtype)
            for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes, strict=True))
        ]

    def concat(self, tensors: Sequence[Any]) -> tf.Tensor:
        """Inside a graph: one float64 vector from per-variable tensors.

        ``IndexedSlices`` are densified (duplicate indices summed); ``None`` becomes zeros.
        """
        parts = []
        for t, shape in zip(tensors, self.shapes, strict=True):
            if t is None:
                parts.append(tf.zeros([int(np.prod(shape, dtype=np.int64))], tf.float64))
                continue
            parts.append(tf.reshape(tf.cast(tf.convert_to_tensor(t), tf.float64), [-1]))
        return tf.concat(parts, axis=0) if parts else tf.zeros([0], tf.float64)
