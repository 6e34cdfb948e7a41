"""2. Derivatives against float64 finite differences and a dense Hessian built by the suite.

Each check asks one question. Gradients are observed through a first-order method
(L-BFGS-B), so an implementation without Hessian support still gets its gradient checked;
Hessian-vector products through each method that takes one (Newton-CG, trust-ncg,
trust-krylov); dense Hessians through trust-exact and dogleg.

Tolerances: central differences on float64 models with h = 1e-6 (gradient) and 1e-5 (HVP,
differencing the gradient) have truncation plus rounding error below ~1e-8 relative for
these smooth O(1) losses; rtol 1e-6 keeps two orders of margin and still catches dropped
terms, wrong signs or scales, stale weights, subsets of the data and float32 arithmetic.
Linearity and symmetry of the HVP hold to rounding for exact products (rtol 1e-9), which
finite-difference products miss by ~h. Where Keras computes a float64 model partly in float32
(Keras 3 on JAX and torch), steps and tolerances widen to that precision (``truth.Steps``).
"""

from __future__ import annotations

import numpy as np
import pytest

from .expect import close_scalar, close_vector, fitted_call, float64_vector
from .problems import HESS_METHODS, HESSP_METHODS, embedding_data, embedding_model, mlp, regression
from .truth import central_gradient, central_jacobian, directional, keras_loss_at

FD = "float64 central finite differences of scipy's own f"
FD_GRAD = "float64 central finite differences of the gradient handed to scipy"


def _observed(impl, observe, keras, model, x, y, method):
    model.compile(loss="mse")
    _, call = fitted_call(impl, observe, model, x, y, method=method, maxiter=1, batch_size=16)
    return call, call.x0 + 0.05 * np.random.default_rng(9).normal(size=call.x0.size)


def _mlp_call(impl, observe, keras, method, l2=0.02):
    X, y = regression(n=30)
    return _observed(impl, observe, keras, mlp(keras, l2=l2), X, y, method)


def test_gradient_is_a_float64_vector(impl, observe, keras, float64, steps):
    call, w = _mlp_call(impl, observe, keras, "L-BFGS-B")
    float64_vector(call.gradient(w), w.size, "the gradient handed to scipy")


def test_gradient_matches_finite_differences(impl, observe, keras, float64, steps):
    call, w = _mlp_call(impl, observe, keras, "L-BFGS-B")
    g = np.asarray(call.gradient(w), dtype=np.float64)
    close_vector(
        g,
        central_gradient(call.value, w, steps.h),
        rtol=steps.rtol,
        atol=steps.atol,
        what="the gradient handed to scipy",
        truth=FD,
        why="the gradient is not the exact gradient of the objective (30 samples in batches of 16, L2 0.02)",
    )


def test_value_matches_keras_where_the_gradient_is_checked(impl, observe, keras, float64, steps):
    """The gradient checks difference scipy's f; this pins that f to Keras's loss on the same problem."""
    X, y = regression(n=30)
    model = mlp(keras, l2=0.02)
    call, w = _observed(impl, observe, keras, model, X, y, "L-BFGS-B")
    close_scalar(
        call.value(w),
        keras_loss_at(model, w, X, y),
        rtol=steps.value,
        what="scipy's f(x)",
        truth="model.evaluate(batch_size=N) on the float64 model of the derivative checks",
        why="the objective whose derivatives are checked is not Keras's loss",
    )


def test_gradient_honours_x_in_any_order(impl, observe, keras, float64, steps):
    """grad(x0) called right after f(x1) must be the gradient at x0."""
    call, x0 = _mlp_call(impl, observe, keras, "L-BFGS-B")
    x1 = x0 + np.random.default_rng(3).normal(size=x0.size)
    at_x1 = central_gradient(call.value, x1, steps.h)
    at_x0 = central_gradient(call.value, x0, steps.h)
    call.value(x1)
    close_vector(
        call.gradient(x0),
        at_x0,
        rtol=steps.rtol,
        atol=steps.atol,
        what="grad(x0) called right after f(x1)",
        truth=f"{FD} at x0",
        why="the gradient callable does not honour its x argument",
        known={"the gradient at x1, the last point evaluated": at_x1},
    )


@pytest.mark.parametrize("method", HESSP_METHODS)
def test_hvp_matches_finite_differences(impl, observe, keras, float64, method, steps):
    call, w = _mlp_call(impl, observe, keras, method)
    p = np.random.default_rng(1).normal(size=w.size)
    hp = call.hvp(w, p)
    close_vector(
        hp,
        directional(call.gradient, w, p, steps.h_hvp),
        rtol=steps.rtol,
        atol=steps.atol,
        what=f"{method}: the Hessian-vector product H(x) p",
        truth=FD_GRAD,
        why="the product is not the exact Hessian of the objective times p (tanh MLP, non-convex: "
        "Gauss-Newton or any other approximation differs; so do products on a subset of the data or in float32)",
        known={
            "-H(x) p (wrong sign)": -directional(call.gradient, w, p, steps.h_hvp),
            "2 H(x) p (wrong scale)": 2 * directional(call.gradient, w, p, steps.h_hvp),
            "H(x) p / 2 (wrong scale)": 0.5 * directional(call.gradient, w, p, steps.h_hvp),
        },
    )


@pytest.mark.parametrize("method", HESS_METHODS)
def test_dense_hessian_matches_finite_differences(impl, observe, keras, float64, method, steps):
    call, w = _mlp_call(impl, observe, keras, method)
    n = w.size
    H_fd = np.stack(
        [directional(call.gradient, w, e, steps.h_hvp) for e in np.eye(n)], axis=1
    )  # suite-built dense Hessian
    H = call.hessian(w)
    assert H.shape == (n, n), f"{method}: the Hessian handed to scipy has shape {H.shape}, expected {(n, n)}"
    close_vector(
        H,
        H.T,
        rtol=steps.exact,
        atol=steps.exact * 1e-3,
        what=f"{method}: the Hessian",
        truth="its transpose",
        why="an exact Hessian of a smooth loss is symmetric",
    )
    close_vector(
        H,
        H_fd,
        rtol=10 * steps.rtol,
        atol=10 * steps.atol,
        what=f"{method}: the dense Hessian handed to scipy",
        truth="the suite's Hessian from " + FD_GRAD,
        why="the matrix is not the exact Hessian",
    )


def test_hvp_is_linear_and_symmetric(impl, observe, keras, float64, steps):
    call, w = _mlp_call(impl, observe, keras, "trust-ncg", l2=0.0)
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=w.size), rng.normal(size=w.size)
    hp, hq = np.asarray(call.hvp(w, p)), np.asarray(call.hvp(w, q))
    close_vector(
        call.hvp(w, 2 * p - 3 * q),
        2 * hp - 3 * hq,
        rtol=steps.exact,
        atol=steps.exact * 1e-2,
        what="H(2p - 3q)",
        truth="2 Hp - 3 Hq from the same hessp",
        why="an exact Hessian-vector product is linear in p (finite-difference products are not, to ~h)",
    )
    lhs, rhs = float(q @ hp), float(p @ hq)
    assert abs(lhs - rhs) <= steps.exact * (abs(lhs) + abs(rhs)) + steps.exact * 1e-3, (
        f"q.(Hp) = {lhs:.12g} but p.(Hq) = {rhs:.12g}: the products are not those of a symmetric matrix "
        "(an exact Hessian is symmetric; finite-difference products are not, to ~h)"
    )


@pytest.mark.parametrize("method", HESSP_METHODS)
def test_hvp_honours_x_in_any_order(impl, observe, keras, float64, method, steps):
    """hessp(x0, p) called right after f(x1) must be the product at x0."""
    call, x0 = _mlp_call(impl, observe, keras, method)
    rng = np.random.default_rng(3)
    x1, p = x0 + rng.normal(size=x0.size), rng.normal(size=x0.size)
    at_x0, at_x1 = directional(call.gradient, x0, p, steps.h_hvp), directional(call.gradient, x1, p, steps.h_hvp)
    call.value(x1)
    close_vector(
        call.hvp(x0, p),
        at_x0,
        rtol=steps.rtol,
        atol=steps.atol,
        what=f"{method}: hessp(x0, p) called right after f(x1)",
        truth=f"{FD_GRAD} at x0",
        why="hessp does not honour its x argument (about a quarter of trust-ncg's products come at a point other "
        "than the last one evaluated)",
        known={"H(x1) p: the product at the weights of the last evaluation": at_x1},
    )


@pytest.mark.parametrize("with_dense", [False, True], ids=["embedding", "embedding+dense"])
def test_embedding_gradient_with_repeated_indices(impl, observe, keras, float64, with_dense, steps):
    ids, y = embedding_data()
    call, w = _observed(impl, observe, keras, embedding_model(keras, with_dense), ids, y, "L-BFGS-B")
    close_vector(
        call.gradient(w),
        central_gradient(call.value, w, steps.h),
        rtol=steps.rtol,
        atol=steps.atol,
        what="the gradient of an Embedding model (every id repeats)",
        truth=FD,
        why="embedding gradients arrive as IndexedSlices whose repeated rows must be summed",
    )


def test_embedding_hvp_with_repeated_indices(impl, observe, keras, float64, steps):
    ids, y = embedding_data()
    call, w = _observed(impl, observe, keras, embedding_model(keras, True), ids, y, "trust-ncg")
    p = np.random.default_rng(4).normal(size=w.size)
    close_vector(
        call.hvp(w, p),
        directional(call.gradient, w, p, steps.h_hvp),
        rtol=steps.rtol,
        atol=steps.atol,
        what="H(x) p of an Embedding model (every id repeats)",
        truth=FD_GRAD,
        why="the product through IndexedSlices is not the exact Hessian times p",
    )


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_least_squares_residuals_and_jacobian(impl, observe, keras, float64, method, steps):
    """Residuals whose squares sum to Keras's loss, and their exact Jacobian."""
    X, y = regression(n=30)
    model = mlp(keras, l2=0.02)
    model.compile(loss="mse")
    _, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=1, batch_size=16)
    assert call.entry == "least_squares", f"{method}: expected scipy.optimize.least_squares, got {call.describe()}"
    w = call.x0 + 0.05 * np.random.default_rng(5).normal(size=call.x0.size)
    r = call.residuals(w)
    truth = keras_loss_at(model, w, X, y)
    assert abs(r @ r - truth) <= 1e-6 * abs(truth), (
        f"{method}: r(x).r(x) = {r @ r:.6g} but model.evaluate(batch_size=N) = {truth:.6g}: the squared residuals "
        "do not sum to Keras's loss (mse over 30 samples plus the L2 term)"
    )
    J = call.jacobian(w)
    assert J.shape == (r.size, w.size), f"{method}: Jacobian shape {J.shape}, expected {(r.size, w.size)}"
    close_vector(
        J,
        central_jacobian(call.residuals, w, steps.h),
        rtol=steps.rtol,
        atol=steps.atol,
        what=f"{method}: the Jacobian",
        truth="float64 central finite differences of the residuals",
        why="the Jacobian is not exact",
    )
