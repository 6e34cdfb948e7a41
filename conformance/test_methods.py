"""3. Methods: every minimize method, its derivatives, no scipy warnings, the closed-form optimum."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize

from .problems import GRADIENT_FREE, METHODS, NEEDS_HESSIAN, TAKES_BOUNDS, USES_HESSIAN, fit, linear_problem
from .truth import keras_loss, trainable_vector

# Gradient-based methods reach the lstsq optimum: final loss within this relative gap.
OPTIMUM_RTOL = 1e-4


def _linear(keras):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    return model


def _scipy_warnings(caught):
    return [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, scipy.optimize.OptimizeWarning) or "scipy" in str(w.filename)
    ]


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_with_its_derivatives(impl, observe, keras, method):
    X, y, coef, optimum = linear_problem()
    model = _linear(keras)
    start = keras_loss(model, X, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(impl, model, X, y, method=method, maxiter=500 if method not in GRADIENT_FREE else 2000)
    assert not _scipy_warnings(caught), f"{method}: scipy warned: {_scipy_warnings(caught)}"
    call = observe.last
    assert call.method.lower() == method.lower(), f"asked for {method}, scipy got {call.method!r}"
    gets_gradient = call.jac is True or callable(call.jac)
    assert gets_gradient == (method not in GRADIENT_FREE), f"{method}: gradient handed over = {gets_gradient}"
    gets_hessian = callable(call.hess) or callable(call.hessp)
    if method in NEEDS_HESSIAN:
        assert gets_hessian, f"{method} needs hess or hessp and got neither"
    elif method not in USES_HESSIAN:
        assert not gets_hessian, f"{method} does not use a Hessian but was handed one"
    final = keras_loss(model, X, y)
    assert final <= start * (1 + 1e-9), f"{method}: ended at {final} above the start {start}"
    np.testing.assert_allclose(history.history["loss"][-1], final, rtol=1e-5)
    if method not in GRADIENT_FREE:
        assert final <= optimum * (1 + OPTIMUM_RTOL), f"{method}: loss {final} vs closed-form optimum {optimum}"


@pytest.mark.parametrize("method", sorted(TAKES_BOUNDS))
def test_bounds_honoured(impl, observe, keras, method):
    X, y, coef, _ = linear_problem()
    model = _linear(keras)
    lo, hi = -0.2, 0.3
    fit(impl, model, X, y, method=method, maxiter=300, make_kwargs=dict(bounds=(lo, hi)))
    assert observe.last.bounds is not None, f"{method}: bounds were not handed to scipy"
    w = trainable_vector(model)
    assert np.all(w >= lo - 1e-9) and np.all(w <= hi + 1e-9), f"{method}: weights {w} outside [{lo}, {hi}]"


LEAST_SQUARES = ("lm", "trf", "dogbox")


@pytest.mark.parametrize("method", LEAST_SQUARES)
def test_least_squares_method_reaches_the_optimum(impl, observe, keras, method):
    X, y, coef, optimum = linear_problem()
    model = _linear(keras)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(impl, model, X, y, method=method, maxiter=200)
    assert not _scipy_warnings(caught), f"{method}: scipy warned: {_scipy_warnings(caught)}"
    call = observe.last
    assert call.kind == "least_squares", f"{method}: expected scipy.optimize.least_squares, got {call.kind}"
    assert (call.method or "trf") == method, f"asked for {method}, least_squares got {call.method!r}"
    assert callable(call.jac), f"{method}: the exact Jacobian must be handed over, got jac={call.jac!r}"
    final = keras_loss(model, X, y)
    np.testing.assert_allclose(history.history["loss"][-1], final, rtol=1e-5)
    assert final <= optimum * (1 + OPTIMUM_RTOL), f"{method}: loss {final} vs closed-form optimum {optimum}"
