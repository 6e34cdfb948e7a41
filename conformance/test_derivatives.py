"""2. Derivatives against float64 finite differences and a dense Hessian built by the suite.

Tolerances: central differences on float64 models with h = 1e-6 (gradient) and 1e-5 (HVP,
differencing the gradient) have truncation plus rounding error below ~1e-8 relative for
these smooth O(1) losses; rtol 1e-6 keeps two orders of margin and still catches dropped
terms, wrong signs or scales, stale weights and float32 gradients (checked by dtype too).
"""

from __future__ import annotations

import numpy as np
import pytest

from .problems import embedding_data, embedding_model, fit, mlp, regression
from .truth import central_gradient, central_jacobian, directional, keras_loss_at

RTOL, ATOL = 1e-6, 1e-8


def _observed(impl, observe, keras, model, x, y, method="trust-ncg"):
    model.compile(loss="mse")
    fit(impl, model, x, y, method=method, maxiter=1, batch_size=16)
    call = observe.last
    return call, call.x0 + 0.05 * np.random.default_rng(9).normal(size=call.x0.size)


def test_gradient_matches_finite_differences(impl, observe, keras, float64):
    X, y = regression(n=30)
    call, w = _observed(impl, observe, keras, mlp(keras, l2=0.02), X, y)
    g = call.gradient(w)
    assert isinstance(g, np.ndarray) and g.dtype == np.float64 and g.shape == w.shape, (
        f"gradient must be a float64 vector of shape {w.shape}, got {type(g).__name__} {getattr(g, 'dtype', None)}"
    )
    np.testing.assert_allclose(g, central_gradient(call.value, w), rtol=RTOL, atol=ATOL)


def test_hvp_matches_finite_differences_and_dense_hessian(impl, observe, keras, float64):
    X, y = regression(n=30)
    call, w = _observed(impl, observe, keras, mlp(keras, l2=0.02), X, y)
    n = w.size
    H = np.stack([directional(call.gradient, w, e) for e in np.eye(n)], axis=1)  # suite-built dense Hessian
    np.testing.assert_allclose(H, H.T, atol=1e-6, err_msg="finite-difference Hessian not symmetric")
    p = np.random.default_rng(1).normal(size=n)
    hp = call.hvp(w, p)
    np.testing.assert_allclose(hp, directional(call.gradient, w, p), rtol=RTOL, atol=ATOL, err_msg="hessp vs FD")
    np.testing.assert_allclose(hp, H @ p, rtol=1e-5, atol=1e-7, err_msg="hessp vs dense FD Hessian times p")


def test_hvp_linear_in_p(impl, observe, keras, float64):
    X, y = regression(n=30)
    call, w = _observed(impl, observe, keras, mlp(keras), X, y)
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=w.size), rng.normal(size=w.size)
    np.testing.assert_allclose(
        call.hvp(w, 2 * p - 3 * q), 2 * call.hvp(w, p) - 3 * call.hvp(w, q), rtol=1e-9, atol=1e-11
    )


def test_callables_honour_x_in_any_order(impl, observe, keras, float64):
    """f at x1, then hessp at x0, must equal hessp at x0 computed fresh."""
    X, y = regression(n=30)
    call, x0 = _observed(impl, observe, keras, mlp(keras), X, y)
    rng = np.random.default_rng(3)
    x1, p = x0 + rng.normal(size=x0.size), rng.normal(size=x0.size)
    fresh_hp, fresh_f, fresh_g = call.hvp(x0, p), call.value(x0), call.gradient(x0)
    call.value(x1)
    np.testing.assert_allclose(call.hvp(x0, p), fresh_hp, rtol=1e-10, err_msg="hessp(x0) after f(x1)")
    call.hvp(x1, p)
    np.testing.assert_allclose(call.value(x0), fresh_f, rtol=1e-12, err_msg="f(x0) after hessp(x1)")
    call.value(x1)
    np.testing.assert_allclose(call.gradient(x0), fresh_g, rtol=1e-10, err_msg="grad(x0) after f(x1)")
    np.testing.assert_allclose(fresh_hp, directional(call.gradient, x0, p), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_dense", [False, True], ids=["embedding", "embedding+dense"])
def test_embedding_repeated_indices(impl, observe, keras, float64, with_dense):
    ids, y = embedding_data()
    call, w = _observed(impl, observe, keras, embedding_model(keras, with_dense), ids, y)
    np.testing.assert_allclose(call.gradient(w), central_gradient(call.value, w), rtol=RTOL, atol=ATOL)
    p = np.random.default_rng(4).normal(size=w.size)
    np.testing.assert_allclose(call.hvp(w, p), directional(call.gradient, w, p), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_least_squares_residuals_and_jacobian(impl, observe, keras, float64, method):
    """Residuals whose squares sum to Keras's loss, and their exact Jacobian."""
    X, y = regression(n=30)
    model = mlp(keras, l2=0.02)
    model.compile(loss="mse")
    fit(impl, model, X, y, method=method, maxiter=1, batch_size=16)
    call = observe.last
    assert call.kind == "least_squares", f"{method}: expected least_squares, got {call.kind}"
    w = call.x0 + 0.05 * np.random.default_rng(5).normal(size=call.x0.size)
    r = np.asarray(call.fun(w), dtype=np.float64)
    np.testing.assert_allclose(r @ r, keras_loss_at(model, w, X, y), rtol=1e-6)
    J = call.jacobian(w)
    assert J.shape == (r.size, w.size), f"Jacobian shape {J.shape}, expected {(r.size, w.size)}"
    np.testing.assert_allclose(J, central_jacobian(call.fun, w), rtol=RTOL, atol=ATOL)
