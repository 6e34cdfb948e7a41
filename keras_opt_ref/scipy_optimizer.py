"""The keras-opt entry point, kept so that code written for keras-opt runs unchanged::

    from keras_opt_ref import scipy_optimizer
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=20)
    history = model.fit(X, y)

The implementation lives in ``keras_opt_ref.train``; this module is also the default
implementation the conformance suite checks (``--impl keras_opt_ref.scipy_optimizer``).
"""

from __future__ import annotations

from .train.train_function import (
    HESSIANS,
    LEAST_SQUARES_METHODS,
    METHODS,
    ScipyTrainFunction,
    make_train_function,
)

__all__ = ["HESSIANS", "LEAST_SQUARES_METHODS", "METHODS", "ScipyTrainFunction", "make_train_function"]
