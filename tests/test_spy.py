"""The conformance observer sees every legal way to call scipy, and evaluates what it saw as scipy would."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from keras_opt_ref_conformance.spy import ImplementationRaised, NotObserved, Observer
from scipy.optimize import fmin_l_bfgs_b as imported_by_name

A = np.array([1.0, -2.0, 0.5])


def f(x, a, scale=1.0):
    return scale * float(np.sum((x - a) ** 4 + (x - a) ** 2))


def g(x, a, scale=1.0):
    return scale * (4 * (x - a) ** 3 + 2 * (x - a))


def fg(x, a, scale=1.0):
    return f(x, a, scale), g(x, a, scale)


def hess(x, a, scale=1.0):
    return scale * np.diag(12 * (x - a) ** 2 + 2)


def hessp(x, p, a, scale=1.0):
    return hess(x, a, scale) @ p


X0 = np.zeros(3)
X1 = np.array([0.3, 0.1, -0.2])
P = np.array([1.0, 2.0, 3.0])


def _assert_sees_the_objective(call, *, gradient=True, hvp=True, scale=1.0):
    assert call.value(X1) == pytest.approx(f(X1, A, scale))
    if gradient:
        np.testing.assert_allclose(call.gradient(X1), g(X1, A, scale))
    if hvp:
        np.testing.assert_allclose(call.hvp(X1, P), hessp(X1, P, A, scale))


@pytest.mark.parametrize(
    "style",
    ["jac=True, args", "positional args and callable jac", "hess callable", "keyword everything"],
)
def test_minimize_calling_conventions(style):
    with Observer("tests") as observe:
        if style == "jac=True, args":
            scipy.optimize.minimize(fg, X0, args=(A, 2.0), jac=True, hessp=hessp, method="trust-ncg",
                                    options={"maxiter": 7})
        elif style == "positional args and callable jac":
            scipy.optimize.minimize(f, X0, (A, 2.0), "Newton-CG", g, None, hessp)
        elif style == "hess callable":
            scipy.optimize.minimize(f, X0, args=(A, 2.0), jac=g, hess=hess, method="trust-exact")
        else:
            scipy.optimize.minimize(fun=f, x0=X0, args=(A, 2.0), method="L-BFGS-B", jac=g,
                                    bounds=[(-1, 1), (None, 0.5), (0, None)], options={"maxiter": 9})
    call = observe.last
    _assert_sees_the_objective(call, hvp=style != "keyword everything", scale=2.0)
    assert call.counts["fun"] >= 1 and call.evaluated, "scipy's calls are counted and the values recorded"
    if style == "jac=True, args":
        assert call.gradient_route == "combined" and call.iteration_limit == ("options['maxiter']", 7)
    if style == "keyword everything":
        lo, hi = call.bounds
        np.testing.assert_array_equal(lo, [-1, -np.inf, 0])
        np.testing.assert_array_equal(hi, [1, 0.5, np.inf])
        assert call.iterations is not None and call.iterations <= 9
    np.testing.assert_allclose(call.final_x, call.result.x)


def test_quasi_newton_hessian_is_not_an_exact_hessian():
    with Observer("tests") as observe:
        scipy.optimize.minimize(f, X0, args=(A,), jac=g, hess=scipy.optimize.BFGS(), method="trust-constr",
                                options={"maxiter": 5})
    call = observe.last
    with pytest.raises(NotObserved, match="approximation"):
        call.hvp(X1, P)


def test_finite_difference_gradient_is_reported_as_such():
    with Observer("tests") as observe:
        scipy.optimize.minimize(f, X0, args=(A,), method="BFGS", options={"maxiter": 3})
    with pytest.raises(NotObserved, match="no exact gradient.*finite differences"):
        observe.last.gradient(X1)


@pytest.mark.parametrize("wrapper", ["fmin_ncg", "fmin_l_bfgs_b", "fmin_tnc", "fmin_cg", "fmin_bfgs", "by name"])
def test_classic_wrappers(wrapper):
    with Observer("tests") as observe:
        if wrapper == "fmin_ncg":
            scipy.optimize.fmin_ncg(f, X0, g, fhess_p=hessp, args=(A, 2.0), maxiter=20, disp=0)
        elif wrapper == "fmin_l_bfgs_b":
            scipy.optimize.fmin_l_bfgs_b(fg, X0, args=(A, 2.0), bounds=[(-1, 1)] * 3, maxiter=11)
        elif wrapper == "fmin_tnc":
            scipy.optimize.fmin_tnc(fg, X0, args=(A, 2.0), maxfun=30, messages=0)
        elif wrapper == "fmin_cg":
            scipy.optimize.fmin_cg(f, X0, fprime=g, args=(A, 2.0), disp=0)
        elif wrapper == "fmin_bfgs":
            scipy.optimize.fmin_bfgs(f, X0, g, (A, 2.0), disp=0)
        else:
            imported_by_name(fg, X0, args=(A, 2.0), maxiter=4)  # `from scipy.optimize import ...` at import time
    call = observe.last
    _assert_sees_the_objective(call, hvp=wrapper == "fmin_ncg", scale=2.0)
    expected = {"fmin_ncg": "Newton-CG", "fmin_tnc": "TNC", "fmin_cg": "CG", "fmin_bfgs": "BFGS"}
    assert call.method == expected.get(wrapper, "L-BFGS-B")
    if wrapper == "fmin_l_bfgs_b":
        assert call.bounds is not None and call.iteration_limit == ("maxiter", 11) and call.iterations <= 11
    if wrapper == "fmin_tnc":
        assert call.iteration_limit == ("maxfun", 30)
    assert call.final_x is not None and call.final_x.shape == (3,)


def test_least_squares_with_args_and_kwargs():
    def residuals(x, a, *, w):
        return w * (x - a)

    def jac(x, a, *, w):
        return w * np.eye(3)

    with Observer("tests") as observe:
        scipy.optimize.least_squares(residuals, X0, jac=jac, args=(A,), kwargs={"w": 3.0}, method="trf",
                                     bounds=(-1.0, [1.0, 1.0, 1.0]), max_nfev=15)
    call = observe.last
    np.testing.assert_allclose(call.residuals(X1), 3.0 * (X1 - A))
    np.testing.assert_allclose(call.jacobian(X1), 3.0 * np.eye(3))
    assert call.method == "trf" and call.iteration_limit == ("max_nfev", 15)
    np.testing.assert_array_equal(call.bounds[0], [-1, -1, -1])


def test_result_x_is_copied_before_the_implementation_can_change_it():
    with Observer("tests") as observe:
        result = scipy.optimize.minimize(fg, X0, args=(A,), jac=True, method="L-BFGS-B")
        scipy_x = result.x.copy()
        result.x[:] = 99.0  # an implementation that rewrites the result afterwards
    np.testing.assert_array_equal(observe.last.final_x, scipy_x)


def test_nothing_observed_and_raising_callables_are_reported_not_crashed():
    with Observer("tests") as observe:
        pass
    with pytest.raises(NotObserved, match="no scipy.optimize call was observed"):
        _ = observe.last

    def fragile(x):
        if np.array_equal(x, X1):
            raise KeyError("boom")
        return float(np.sum(x**2))

    with Observer("tests") as observe:
        scipy.optimize.minimize(fragile, X0, method="Nelder-Mead", options={"maxiter": 1})
    with pytest.raises(ImplementationRaised, match="fun raised KeyError"):
        observe.last.value(X1)


def test_interrupt_injection_and_restoring_scipy():
    real = scipy.optimize.minimize
    with Observer("tests") as observe:
        observe.interrupt_at = 3
        with pytest.raises(KeyboardInterrupt):
            scipy.optimize.minimize(fg, X0, args=(A,), jac=True, method="L-BFGS-B")
    # before the interrupt the suite evaluates once more, far from the best point (worse): the last point
    # evaluated, the best point and the start are then three points
    seen = observe.last.evaluated
    assert observe.last.counts["fun"] == 3 and len(seen) == 3 and seen[-1][1] > max(f for _, f in seen[:-1])
    assert scipy.optimize.minimize is real and imported_by_name is scipy.optimize.fmin_l_bfgs_b


def test_an_evaluation_after_scipy_returns_is_far_from_its_x():
    """``evaluate_after_return``: one more evaluation, worse than scipy's x, before the caller sees the result."""
    with Observer("tests") as observe:
        observe.evaluate_after_return = True
        result = scipy.optimize.minimize(fg, X0, args=(A,), jac=True, method="L-BFGS-B")
    call = observe.last
    assert call.after_return is not None and np.array_equal(call.evaluated[-1][0], call.after_return)
    assert call.evaluated[-1][1] > result.fun and np.array_equal(call.final_x, result.x)
    assert call.counts["fun"] == result.nfev  # scipy's own count: the extra evaluation is not scipy's
