"""3. Methods: every minimize method, its derivatives, no scipy warnings, the closed-form optimum; bounds,
constraints and iteration limits as scipy received them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize

from . import probes
from .expect import close_scalar, fitted_call, history_value
from .problems import (
    GRADIENT_FREE,
    LEAST_SQUARES,
    METHODS,
    NEEDS_HESSIAN,
    TAKES_BOUNDS,
    USES_HESSIAN,
    linear,
    linear_problem,
    nonneg_problem,
)
from .truth import keras_loss, trainable_vector

# Gradient-based methods reach the lstsq optimum: final loss within this relative gap.
OPTIMUM_RTOL = 1e-4


def _scipy_warnings(caught):
    return [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, scipy.optimize.OptimizeWarning) or "scipy" in str(w.filename)
    ]


def _same_method(asked: str, got: str) -> bool:
    return asked.lower() == str(got).lower()


def _history_loss_is_final(method, history, call, final):
    seen = [f for _, f in call.evaluated if np.isfinite(f)]
    close_scalar(history_value(history, "loss"), final, rtol=1e-5, what=f"{method}: history['loss']",
                 truth="model.evaluate at the final weights", why="the epoch's loss must be the loss where fit ended",
                 known={"the mean of all losses evaluated during the run": np.mean(seen)} if seen else None)


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_with_its_derivatives(impl, observe, keras, method):
    X, y, coef, optimum = linear_problem()
    model = linear(keras)
    start = keras_loss(model, X, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history, call = fitted_call(impl, observe, model, X, y, method=method,
                                    maxiter=500 if method not in GRADIENT_FREE else 2000)
    assert _same_method(method, call.method), f"asked for {method}, scipy ran {call.describe()}"
    gets_gradient = call.gradient_route is not None
    if method in GRADIENT_FREE:
        if gets_gradient:  # scipy ignores it (and warns): wasted evaluations, not a wrong result
            observe.warn(f"{method} uses no gradient but was handed one ({call.describe()}): each evaluation computes "
                         "a gradient scipy throws away")
    else:
        assert gets_gradient, f"{method} needs the exact gradient and got none ({call.gradient_note})"
    gets_hessian = call.hess is not None or call.hessp is not None
    if method in NEEDS_HESSIAN:
        assert gets_hessian, f"{method} needs hess or hessp and got neither ({call.hess_note or call.describe()})"
    elif method not in USES_HESSIAN and gets_hessian:
        observe.warn(f"{method} does not use a Hessian but was handed one ({call.describe()}); scipy ignores it")
    final = keras_loss(model, X, y)
    assert final <= start * (1 + 1e-9), f"{method}: the model ended at loss {final:.6g}, above the start {start:.6g}"
    _history_loss_is_final(method, history, call, final)
    warned = _scipy_warnings(caught)
    if method not in GRADIENT_FREE:
        assert final <= optimum * (1 + OPTIMUM_RTOL), (
            f"{method}: loss {final:.8g} after up to 500 iterations, but the closed-form (lstsq) optimum is "
            f"{optimum:.8g}: the method did not converge on a 4-weight linear least-squares problem"
            + (f" (scipy warned: {warned})" if warned else "")
        )
    _warn_about(observe, method, warned)


def _warn_about(observe, method, warned) -> None:
    """scipy's warnings alone never fail a check (some are informational: trust-constr's "delta_grad == 0.0 ...
    If the function is linear ..." on a linear model); the result decides, and the warnings are reported."""
    if warned:
        observe.warn(f"{method}: scipy warned, and the run reached the optimum: {warned}")


@pytest.mark.level("bounds")
@pytest.mark.parametrize("method", [*sorted(TAKES_BOUNDS), "trf", "dogbox"])
def test_bounds_honoured(impl, observe, keras, method):
    X, y, coef, _ = linear_problem()
    model = linear(keras)
    lo, hi = -0.2, 0.3
    _, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=300, make_kwargs=dict(bounds=(lo, hi)))
    assert call.bounds is not None, f"{method}: bounds=({lo}, {hi}) were not handed to scipy ({call.describe()})"
    got_lo, got_hi = call.bounds
    assert np.allclose(got_lo, lo) and np.allclose(got_hi, hi), (
        f"{method}: scipy got bounds lo={got_lo}, hi={got_hi}; asked for ({lo}, {hi}) on every weight"
    )
    w = trainable_vector(model)
    slack = 1e-7 * max(abs(lo), abs(hi))  # float32 weights cannot hold 0.3 or -0.2 exactly: one rounding
    if not (np.all(w >= lo - slack) and np.all(w <= hi + slack)):
        named = probes.named_points(call)
        where = probes.which_points(w, {k: named[k] for k in ("result.x (scipy's returned point)",
                                                              "the last point evaluated")})
        cause = ""
        if where == ["the last point evaluated"]:
            cause = (f" They equal the last point scipy evaluated, not result.x: result.x was not written back, and "
                     f"{method} may evaluate outside the bounds")
        elif "result.x (scipy's returned point)" in where:
            cause = " They equal result.x: scipy itself ended outside the bounds it was handed"
        raise AssertionError(f"{method}: final weights {w} outside [{lo}, {hi}] (beyond the weights' own rounding, "
                             f"{slack:.1g}).{cause}")


@pytest.mark.level("bounds")
def test_nonneg_constraint_honoured(impl, observe, keras):
    """A Keras NonNeg kernel constraint: fit with a bounded method leaves the kernel >= 0, as Keras's own fit does."""
    X, y = nonneg_problem()
    model = linear(keras, kernel_constraint=keras.constraints.NonNeg(), use_bias=False)
    fitted_call(impl, observe, model, X, y, method="L-BFGS-B", maxiter=100)
    kernel = np.asarray(model.layers[-1].kernel.numpy()).ravel()
    assert np.all(kernel >= -1e-9), (
        f"kernel {kernel.round(4)} after fit with L-BFGS-B has negative entries, but the layer has a NonNeg "
        "constraint (the unconstrained optimum is [1, -2, 0.5]); the constraint was not enforced"
    )


@pytest.mark.parametrize("method", ["L-BFGS-B", "TNC", "trust-ncg", "Nelder-Mead"])
def test_maxiter_reaches_scipy(impl, observe, keras, method):
    X, y, _, _ = linear_problem()
    model = linear(keras)
    _, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=3)
    limit = call.iteration_limit
    expected = "maxfun" if method == "TNC" else "maxiter"
    got = f"{limit[0]}={limit[1]!r}" if limit else f"no {expected}"
    assert limit is not None and limit[1] == 3, (
        f"{method}: make_train_function(maxiter=3), but scipy got {got} ({call.describe()}): "
        "the iteration limit did not reach scipy"
    )
    nit = call.iterations
    assert nit is None or nit <= 3, f"{method}: scipy reports {nit} iterations with maxiter=3"


@pytest.mark.parametrize("method", LEAST_SQUARES)
def test_least_squares_method_reaches_the_optimum(impl, observe, keras, method):
    X, y, coef, optimum = linear_problem()
    model = linear(keras)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=200)
    assert call.entry == "least_squares", f"{method}: expected scipy.optimize.least_squares, got {call.describe()}"
    assert call.method == method, f"asked for {method}, least_squares got method={call.method!r}"
    assert callable(call.jac), f"{method}: the exact Jacobian must be handed over, got jac={call.jac!r}"
    final = keras_loss(model, X, y)
    _history_loss_is_final(method, history, call, final)
    warned = _scipy_warnings(caught)
    assert final <= optimum * (1 + OPTIMUM_RTOL), (
        f"{method}: loss {final:.8g} vs closed-form optimum {optimum:.8g}" + (f" (scipy warned: {warned})" if warned
                                                                            else ""))
    _warn_about(observe, method, warned)
