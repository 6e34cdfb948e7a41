"""keras_opt_ref: drive Keras models with scipy.optimize on the exact full-batch loss.

``from keras_opt_ref import scipy_optimizer`` then
``model.train_function = scipy_optimizer.make_train_function(model, method=..., maxiter=...)``.
"""

from __future__ import annotations

from . import scipy_optimizer
from .flat import FlatVariables
from .objective import FullBatchObjective, HessianTooLargeError
from .scipy_optimizer import METHODS, ScipyTrainFunction, make_train_function

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "FlatVariables",
    "FullBatchObjective",
    "HessianTooLargeError",
    "ScipyTrainFunction",
    "__version__",
    "make_train_function",
    "scipy_optimizer",
]
