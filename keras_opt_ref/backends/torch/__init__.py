"""The torch backend: Keras 3 with ``KERAS_BACKEND=torch``.

``objective`` (value, gradient, HVP and Hessian by eager autograd over chunks), ``fit`` (how
Keras's torch ``fit`` calls the train function). Least squares, the Gauss-Newton matrix and the
in-graph trust-ncg subproblem are TensorFlow's only.
"""

from __future__ import annotations

from typing import Any

TITLE = "torch"
CAPABILITIES: frozenset[str] = frozenset()


def objective_class(model: Any, least_squares: str = "") -> type:
    from .objective import TorchObjective

    return TorchObjective
