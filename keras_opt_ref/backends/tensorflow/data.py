"""The data on TensorFlow: leaves as dense tensors, batches joined, iterators that never end."""

from __future__ import annotations

from typing import Any

import scipy.sparse
import tensorflow as tf

from ...base.checks import summary
from ...base.data import concatenate as join_batches

__all__ = ["concatenate", "is_infinite", "to_tensor"]


def to_tensor(where: str, leaf: Any) -> tf.Tensor:
    """A data leaf as a dense tensor. Sparse leaves (``tf.SparseTensor``, scipy.sparse) are
    densified: the model then computes the same values, and the size check before bounds the
    memory. Ragged tensors are refused (their rows have no exact dense form), as is anything
    ``tf.convert_to_tensor`` cannot take."""
    if isinstance(leaf, tf.RaggedTensor):
        raise ValueError(
            f"The {where} are a tf.RaggedTensor: rows of different lengths have no exact dense form, so "
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
            f"The {where} ({type(leaf).__name__}) cannot be converted to a tensor ({summary(exc)}). "
            "Pass numeric arrays or tensors of one dtype and rectangular shape."
        ) from None


def concatenate(batches: list[Any]) -> Any:
    """One batch from several drained ones (sparse parts stay sparse)."""

    def join(*parts: Any) -> Any:
        if isinstance(parts[0], tf.SparseTensor):
            return tf.sparse.concat(0, list(parts), expand_nonconcat_dims=True)
        return tf.concat(parts, axis=0)

    return join_batches(batches, join)


def is_infinite(iterator: Any) -> bool:
    """Whether a data iterator fit hands over is known to never end (a ``.repeat()`` dataset).

    Keras 3 passes the ``tf.data`` iterator itself; its dataset knows its cardinality.
    """
    dataset = getattr(iterator, "_dataset", None)
    if dataset is None or not hasattr(dataset, "cardinality"):
        return False
    try:
        return int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    except (TypeError, ValueError, tf.errors.OpError):
        return False

