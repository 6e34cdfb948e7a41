"""keras_opt_ref: drive Keras models with scipy.optimize on the exact full-batch loss.

``from keras_opt_ref import scipy_optimizer`` then
``model.train_function = scipy_optimizer.make_train_function(model, method=..., maxiter=...)``;
or, without ``fit``, ``objective = make_objective(model, x, y)`` and its ``value``,
``value_and_grad``, ``hessp`` and ``hessian`` on float64 NumPy vectors.

Importing the package loads no framework: the model's backend is imported when a train function
or an objective is made for it (``keras_opt_ref.backends``). ``FullBatchObjective`` and
``LeastSquaresObjective`` (TensorFlow) are imported on first use.
"""

from __future__ import annotations

import importlib

from . import scipy_optimizer
from .backends import make_objective, objective_class
from .base.checks import NotSquaredErrorError
from .base.flat import FlatVariables
from .base.objective import HessianTooLargeError, Objective
from .base.settings import Settings
from .train.train_function import LEAST_SQUARES_METHODS, METHODS, ScipyTrainFunction, make_train_function

__version__ = "0.1.0"

# TensorFlow-only names, loaded with TensorFlow on first use.
_ON_FIRST_USE = {
    "FullBatchObjective": "keras_opt_ref.backends.tensorflow.objective",
    "TensorFlowObjective": "keras_opt_ref.backends.tensorflow.objective",
    "LeastSquaresObjective": "keras_opt_ref.backends.tensorflow.least_squares",
    "JacobianTooLargeError": "keras_opt_ref.backends.tensorflow.least_squares",
}

__all__ = [
    "LEAST_SQUARES_METHODS",
    "METHODS",
    "FlatVariables",
    "FullBatchObjective",
    "HessianTooLargeError",
    "JacobianTooLargeError",
    "LeastSquaresObjective",
    "NotSquaredErrorError",
    "Objective",
    "ScipyTrainFunction",
    "Settings",
    "TensorFlowObjective",
    "__version__",
    "make_objective",
    "make_train_function",
    "objective_class",
    "scipy_optimizer",
]


def __getattr__(name: str):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'keras_opt_ref' has no attribute {name!r}")
    value = getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
