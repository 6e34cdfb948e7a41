"""How Keras's torch ``fit`` calls the train function.

``fit`` calls ``logs = train_function([batch])`` once per batch. The batches are collected until
the epoch's last one (``fit``'s History knows how many an epoch has), which runs the optimization
over all of them; the calls before it return the last epoch's logs.
"""

from __future__ import annotations

import weakref
from typing import Any

from ...base import data, keras_compat

__all__ = ["FitProtocol"]


class FitProtocol:
    """``logs = train_function([batch])``, once per batch."""

    concatenate = staticmethod(data.concatenate)

    def __init__(self) -> None:
        self._history: Any = lambda: None  # the running fit's History, weakly: a new fit starts afresh
        self._batches: list[Any] = []
        self._logs: dict[str, Any] = {}

    def __call__(self, train: Any, batches: list[Any]) -> dict[str, Any]:
        steps = keras_compat.fit_steps_per_epoch(train.model)
        if steps is None:
            raise ValueError(
                "On the torch backend fit hands the train function one batch at a time, and this data source does "
                "not say how many batches an epoch has, so the full training set is never known. Pass "
                "steps_per_epoch=... (that many batches form each epoch's training set), or arrays / a dataset of "
                "known length."
            )
        history = getattr(train.model, "history", None)
        if self._history() is not history:  # a new fit: start collecting afresh
            self._history, self._batches = weakref.ref(history) if history is not None else (lambda: None), []
        self._batches.extend(batches)
        if len(self._batches) < steps:
            return self._logs
        epoch, self._batches = self._batches, []
        self._logs = train.optimize(epoch)
        return self._logs

    def prepare(self, batches: list[Any]) -> list[Any]:
        return keras_compat.numpy_batches(batches)
