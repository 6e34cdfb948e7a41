"""keras_opt_ref: drive Keras models with scipy.optimize on the exact full-batch loss.

``from keras_opt_ref import scipy_optimizer`` then
``model.train_function = scipy_optimizer.make_train_function(model, method=..., maxiter=...)``.

Names are imported on first use, so that ``keras-opt-ref`` can configure TensorFlow's
logging before TensorFlow loads.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "scipy_optimizer": ("keras_opt_ref.scipy_optimizer", None),
    "workloads": ("keras_opt_ref.workloads", None),
    "bench": ("keras_opt_ref.bench", None),
    "baselines": ("keras_opt_ref.baselines", None),
    "least_squares": ("keras_opt_ref.least_squares", None),
    "same_math": ("keras_opt_ref.same_math", None),
    "LeastSquaresObjective": ("keras_opt_ref.least_squares", "LeastSquaresObjective"),
    "FlatVariables": ("keras_opt_ref.flat", "FlatVariables"),
    "FullBatchObjective": ("keras_opt_ref.objective", "FullBatchObjective"),
    "make_objective": ("keras_opt_ref.core", "make_objective"),
    "HessianTooLargeError": ("keras_opt_ref.objective", "HessianTooLargeError"),
    "METHODS": ("keras_opt_ref.scipy_optimizer", "METHODS"),
    "ScipyTrainFunction": ("keras_opt_ref.scipy_optimizer", "ScipyTrainFunction"),
    "make_train_function": ("keras_opt_ref.scipy_optimizer", "make_train_function"),
}

__all__ = [
    "METHODS",
    "FlatVariables",
    "FullBatchObjective",
    "HessianTooLargeError",
    "LeastSquaresObjective",
    "ScipyTrainFunction",
    "__version__",
    "baselines",
    "bench",
    "least_squares",
    "make_objective",
    "make_train_function",
    "same_math",
    "scipy_optimizer",
    "workloads",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'keras_opt_ref' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
