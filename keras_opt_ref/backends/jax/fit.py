"""How Keras's JAX ``fit`` calls the train function.

``fit`` empties the model's variables for the epoch and calls ``logs, state =
train_function(state, iterator)``, with ``state`` the variables' values (trainable,
non-trainable, optimizer, metrics) and one iterator spanning the epoch. The values are put back
into the variables first, so that the objective and ``evaluate`` see the model as it is; the
optimized trainable values go back in the returned state.
"""

from __future__ import annotations

from typing import Any

from ...base import data, keras_compat

__all__ = ["FitProtocol"]


class FitProtocol:
    """``logs, state = train_function(state, iterator)``."""

    concatenate = staticmethod(data.concatenate)

    def __call__(self, train: Any, state: tuple, iterator: Any) -> tuple[dict[str, Any], tuple]:
        model = train.model
        groups = (model.trainable_variables, model.non_trainable_variables,
                  getattr(getattr(model, "optimizer", None), "variables", []), model.metrics_variables)
        for variables, values in zip(groups, state, strict=False):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
        logs = train.epoch(iterator)
        return logs, ([v.value for v in model.trainable_variables], *state[1:])

    def is_infinite(self, iterator: Any) -> bool:
        return False  # Keras's JAX iterators over arrays end; an endless generator needs steps_per_epoch

    def drain(self, iterator: Any, count: int | None, max_bytes: int, model: Any) -> list[Any]:
        return data.drain(iterator, count, max_bytes)

    def prepare(self, batches: list[Any]) -> list[Any]:
        return keras_compat.numpy_batches(batches)
