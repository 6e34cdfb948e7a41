"""The backend registry: the one place that names the backends.

A backend is a package ``keras_opt_ref.backends.<name>`` that provides

- ``TITLE``: its name in messages ("TensorFlow");
- ``CAPABILITIES``: what it computes beyond the minimize methods' derivatives, among
  ``"least_squares"`` (``method='lm'/'trf'/'dogbox'``), ``"gauss_newton"``
  (``hessian='gauss-newton'``) and ``"in_graph_subproblem"`` (``subproblem='in-graph'``);
- ``objective_class(model, least_squares="")``: the :class:`~keras_opt_ref.base.objective.Objective`
  subclass for a model (``least_squares``: what asks for residuals, for the refusal message);
- a module ``fit`` with ``FitProtocol``: how Keras's ``fit`` on this backend calls
  ``model.train_function``.

Backends are imported on first use, so that only the framework a model runs on is loaded.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..base import keras_compat

__all__ = ["BACKENDS", "backend", "backend_of", "fit_protocol", "make_objective", "objective_class", "providing"]

BACKENDS = {
    "tensorflow": "keras_opt_ref.backends.tensorflow",
    "jax": "keras_opt_ref.backends.jax",
    "torch": "keras_opt_ref.backends.torch",
}


def backend_of(model: Any) -> str:
    """``"tensorflow"`` (tf-keras, or Keras 3 on TensorFlow), ``"jax"`` or ``"torch"``."""
    if keras_compat.flavour(model) == "tf_keras":
        return "tensorflow"
    import keras

    return keras.backend.backend()


def backend(name: str) -> ModuleType:
    """The backend package ``name`` (imported now, with its framework)."""
    if name not in BACKENDS:
        raise ValueError(
            f"Keras backend {name!r} is not supported; use one of {sorted(BACKENDS)} (KERAS_BACKEND=...)."
        )
    return importlib.import_module(BACKENDS[name])


def providing(capability: str) -> list[str]:
    """The titles of the backends that compute ``capability`` (imports each backend package, not its
    framework: a package's ``__init__`` names its capabilities before it imports anything heavy)."""
    packages = [backend(name) for name in BACKENDS]
    return [package.TITLE for package in packages if capability in package.CAPABILITIES]


def fit_protocol(name: str) -> Any:
    """A new ``FitProtocol`` of backend ``name`` (its ``fit`` module)."""
    backend(name)
    return importlib.import_module(f"{BACKENDS[name]}.fit").FitProtocol()


def objective_class(model: Any, least_squares: str = "") -> type:
    """The objective class for the model's backend (``least_squares``: residuals are needed, asked
    for by what it names)."""
    return backend(backend_of(model)).objective_class(model, least_squares)


def make_objective(model: Any, x: Any, y: Any = None, sample_weight: Any = None, **settings: Any) -> Any:
    """The full-batch objective of ``model`` on ``(x, y, sample_weight)`` for the model's backend
    (settings: :class:`~keras_opt_ref.base.settings.Settings`): ``value``, ``value_and_grad``,
    ``hessp``, ``hessian`` on float64 NumPy vectors, without ``fit``."""
    return objective_class(model)(model, x, y, sample_weight, **settings)
