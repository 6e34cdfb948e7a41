"""The JAX backend: Keras 3 with ``KERAS_BACKEND=jax``.

``objective`` (value, gradient, HVP and Hessian as jitted pure functions of the weights),
``fit`` (how Keras's JAX ``fit`` calls the train function). Least squares, the Gauss-Newton
matrix and the in-graph trust-ncg subproblem are TensorFlow's only.
"""

from __future__ import annotations

from typing import Any

TITLE = "JAX"
CAPABILITIES: frozenset[str] = frozenset()


def objective_class(model: Any, least_squares: str = "") -> type:
    from .objective import JaxObjective

    return JaxObjective
