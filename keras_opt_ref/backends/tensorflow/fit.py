"""How Keras's TensorFlow ``fit`` (Keras 3 and tf-keras) calls the train function.

``fit`` calls ``train_function(iterator)`` once per step (of ``steps_per_execution`` batches),
with one iterator spanning the epoch: the train function's ``epoch`` drains it on the first call.
Under a ``tf.distribute`` strategy each batch holds one part per local replica; the parts are
taken as batches of their own.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from ...base import data
from .data import concatenate, is_infinite
from .distributed import strategy_of

__all__ = ["FitProtocol"]


class FitProtocol:
    """``logs = train_function(iterator)``."""

    is_infinite = staticmethod(is_infinite)
    concatenate = staticmethod(concatenate)

    def __call__(self, train: Any, iterator: Any) -> dict[str, Any]:
        return train.epoch(iterator)

    def drain(self, iterator: Any, count: int | None, max_bytes: int, model: Any) -> list[Any]:
        strategy = strategy_of(model)
        parts = None if strategy is None else (lambda batch: list(strategy.experimental_local_results(batch)))
        return data.drain(iterator, count, max_bytes, join=concatenate, parts=parts,
                          ends=(StopIteration, tf.errors.OutOfRangeError))

    def prepare(self, batches: list[Any]) -> list[Any]:
        return batches
