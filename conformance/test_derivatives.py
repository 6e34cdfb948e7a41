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

from . import probes
from .expect import close_scalar, close_vector, fitted_call, float64_vector
from .pinn_problem import POINTS, fitted_pinn
from .problems import (
    HESS_METHODS,
    HESSP_METHODS,
    conv_data,
    conv_model,
    embedding_data,
    embedding_model,
    mlp,
    regression,
)
from .truth import central_gradient, central_jacobian, directional, keras_loss_at

FD = "float64 central finite differences of scipy's own f"
FD_GRAD = "float64 central finite differences of the gradient handed to scipy"


def _observed(impl, observe, keras, model, x, y, method, steps=None, checked="the derivatives"):
    """fit with ``method``; the call scipy got and a point near x0. With ``steps``, f must first carry the
    precision the finite differences need (``probes.require_float64``)."""
    model.compile(loss="mse")
    _, call = fitted_call(impl, observe, model, x, y, method=method, maxiter=1, batch_size=16)
    w = call.x0 + 0.05 * np.random.default_rng(9).normal(size=call.x0.size)
    if steps is not None:
        probes.require_float64(call, lambda v: keras_loss_at(model, v, x, y), w, steps, checked)
    return call, w


def _mlp_call(impl, observe, keras, method, l2=0.02, steps=None, checked="the derivatives"):
    X, y = regression(n=30)
    return _observed(impl, observe, keras, mlp(keras, l2=l2), X, y, method, steps, checked)


def test_gradient_is_a_float64_vector(impl, observe, keras, float64, steps):
    call, w = _mlp_call(impl, observe, keras, "L-BFGS-B")
    float64_vector(call.gradient(w), w.size, "the gradient handed to scipy")


@pytest.mark.parametrize("model_kind", ["mlp", "conv1d"])
def test_gradient_matches_finite_differences(impl, observe, keras, float64, steps, model_kind):
    if model_kind == "mlp":
        call, w = _mlp_call(impl, observe, keras, "L-BFGS-B", steps=steps, checked="the gradient")
        problem = "30 samples in batches of 16, L2 0.02"
    else:
        X, y = conv_data(rank=1)
        call, w = _observed(impl, observe, keras, conv_model(keras, rank=1), X, y, "L-BFGS-B", steps, "the gradient")
        problem = "a Conv1D model: a rank-3 kernel"
    g = np.asarray(call.gradient(w), dtype=np.float64)
    close_vector(
        g,
        central_gradient(call.value, w, steps.h, steps.order),
        rtol=steps.rtol,
        atol=steps.atol,
        what="the gradient handed to scipy",
        truth=FD,
        why=f"the gradient is not the exact gradient of the objective ({problem})",
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


def test_gradient_honours_x_in_any_order(impl, observe, keras, float64):
    """grad(x0) called right after f(x1) must be the gradient at x0 (compared with the implementation's own
    gradient at x0 taken fresh, so that neither precision nor finite differences can pass for state)."""
    call, x0 = _mlp_call(impl, observe, keras, "L-BFGS-B")
    x1 = x0 + np.random.default_rng(3).normal(size=x0.size)
    _which_point(call, "g", x0, x1, p=None, what="grad(x0) called right after f(x1)",
                 why="the gradient callable does not honour its x argument")


def _which_point(call, kind, x0, x1, p, what, why):
    want, at_x1 = probes.fresh(call, kind, x0, p), probes.fresh(call, kind, x1, p, seed=1)
    call.value(x1)
    got = probes.evaluate(call, kind, x0, p)
    if probes.same(got, want):
        return
    named = probes.name_point(got, {"the value at x1, the weights of the last evaluation": at_x1})
    close_vector(got, want, rtol=probes.SAME_RTOL, atol=0.0, what=what,
                 truth="the implementation's own value at x0 taken fresh (f(x0), then the gradient, then it)",
                 why=f"{why}" + (f": it equals {named}" if named else ""))


@pytest.mark.parametrize("method", HESSP_METHODS)
def test_hvp_matches_finite_differences(impl, observe, keras, float64, method, steps):
    call, w = _mlp_call(impl, observe, keras, method, steps=steps, checked="Hessian-vector products")
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
    call, w = _mlp_call(impl, observe, keras, method, steps=steps, checked="the dense Hessian")
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


@pytest.mark.level("curvature", method="trust-ncg")
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
def test_hvp_honours_x_in_any_order(impl, observe, keras, float64, method):
    """hessp(x0, p) called right after f(x1) must be the product at x0 (about a quarter of trust-ncg's products
    come at a point other than the last one evaluated)."""
    call, x0 = _mlp_call(impl, observe, keras, method)
    rng = np.random.default_rng(3)
    x1, p = x0 + rng.normal(size=x0.size), rng.normal(size=x0.size)
    _which_point(call, "hvp", x0, x1, p, what=f"{method}: hessp(x0, p) called right after f(x1)",
                 why="hessp does not honour its x argument")


@pytest.mark.level("curvature", method="trust-ncg")
def test_hvp_memo_is_keyed_on_the_whole_x(impl, observe, keras, float64):
    """Products after f, the gradient or another product at a point that a cheap key confuses with theirs."""
    call, _ = _mlp_call(impl, observe, keras, "trust-ncg")
    p = np.random.default_rng(6).normal(size=call.x0.size)
    probes.check_collisions(call, [("f", "hvp"), ("g", "hvp"), ("hvp", "hvp")], "Hessian-vector products", p=p)


@pytest.mark.parametrize("with_dense", [False, True], ids=["embedding", "embedding+dense"])
def test_embedding_gradient_with_repeated_indices(impl, observe, keras, float64, with_dense, steps):
    ids, y = embedding_data()
    call, w = _observed(impl, observe, keras, embedding_model(keras, with_dense), ids, y, "L-BFGS-B", steps,
                        "the gradient")
    close_vector(
        call.gradient(w),
        central_gradient(call.value, w, steps.h, steps.order),
        rtol=steps.rtol,
        atol=steps.atol,
        what="the gradient of an Embedding model (every id repeats)",
        truth=FD,
        why="embedding gradients arrive as IndexedSlices whose repeated rows must be summed",
    )


@pytest.mark.level("curvature", method="trust-ncg")
def test_embedding_hvp_with_repeated_indices(impl, observe, keras, float64, steps):
    ids, y = embedding_data()
    call, w = _observed(impl, observe, keras, embedding_model(keras, True), ids, y, "trust-ncg", steps,
                        "Hessian-vector products")
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
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample-weights"])
def test_least_squares_residuals_and_jacobian(impl, observe, keras, float64, method, weighted, steps):
    """Residuals whose squares sum to Keras's loss, and their exact Jacobian (with sample weights, the weights
    are inside both)."""
    X, y = regression(n=30)
    sw = np.random.default_rng(7).uniform(0.2, 3.0, size=30) if weighted else None
    model = mlp(keras)  # no regularizer: writing one as residuals is the reference's extra, not the contract
    model.compile(loss="mse")
    _, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=1, batch_size=16, sample_weight=sw)
    assert call.entry == "least_squares", f"{method}: expected scipy.optimize.least_squares, got {call.describe()}"
    w = call.x0 + 0.05 * np.random.default_rng(5).normal(size=call.x0.size)
    r = call.residuals(w)
    truth = keras_loss_at(model, w, X, y, sw)
    problems = []  # both parts are checked, so that a wrong scale does not hide a wrong Jacobian
    if abs(r @ r - truth) > 1e-6 * abs(truth):
        ratio = (r @ r) / truth
        scaled = ""
        for name, n in (("the number of samples", len(X)), ("the number of residuals", r.size)):
            if abs(ratio - n) <= 1e-6 * n and n > 1:
                scaled = (f" r.r = {n} x the loss: factor N = {n}, {name}: the residuals are not divided by sqrt(N) "
                          "(same minimizer, but scipy's cost, gtol and ftol act on N times the loss)")
                break
        problems.append(
            f"{method}: r(x).r(x) = {r @ r:.6g} but model.evaluate(batch_size=N) = {truth:.6g}: the squared residuals "
            f"do not sum to Keras's loss (mse over 30 samples{', with sample weights' if weighted else ''}).{scaled}")
    J = call.jacobian(w)
    assert J.shape == (r.size, w.size), f"{method}: Jacobian shape {J.shape}, expected {(r.size, w.size)}"
    try:
        close_vector(
            J,
            central_jacobian(call.residuals, w, steps.h),
            rtol=steps.rtol,
            atol=steps.atol,
            what=f"{method}: the Jacobian",
            truth="float64 central finite differences of the residuals",
            why="the Jacobian is not the derivative of the residuals" + (
                " (with sample weights: they must be inside the Jacobian as they are inside the residuals)"
                if weighted else ""),
        )
    except AssertionError as exc:
        problems.append(str(exc))
    assert not problems, "\n".join(problems)


PINN = (f"a PINN: compute_loss overridden, the mean squared residual of -u'' = f at {POINTS} collocation points "
        "through the network's second input derivative, plus a boundary term")


def _pinn_call(impl, observe, keras, method, steps, checked):
    """The PINN fit, f's precision checked at the start (``probes.require_float64_at_start``: it needs no layout),
    and a point near x0 in the implementation's own layout. Returns also what a wrong layout of x means here."""
    problem, call = fitted_pinn(impl, observe, keras, method)
    probes.require_float64_at_start(call, problem.compute_loss_at(problem.start), steps, checked,
                                    "model.compute_loss at the start weights")
    w = call.x0 + 0.05 * np.random.default_rng(17).normal(size=call.x0.size)
    layout = problem.layout_problem(call.x0)
    return problem, call, w, (f" Also: {layout} (then f's finite differences move the non-trainable weights too)"
                              if layout else "")


def test_pinn_gradient_matches_finite_differences(impl, observe, keras, float64, steps):
    """The gradient of a loss that differentiates the network with respect to its inputs: a third derivative of
    the network, exact autodiff through the input derivatives."""
    problem, call, w, layout = _pinn_call(impl, observe, keras, "L-BFGS-B", steps, "the gradient")
    g = call.gradient(w)
    probes.require_float64_vector(g, steps, "the gradient handed to scipy", "Compute it in the model's dtype.")
    close_vector(
        np.asarray(g, dtype=np.float64),
        central_gradient(call.value, w, steps.h, steps.order),
        rtol=steps.rtol,
        atol=steps.atol,
        what="the gradient handed to scipy",
        truth=FD,
        why=f"the gradient is not the exact gradient of the objective ({PINN}).{layout}",
        known=None if layout else problem.known_gradients(w),
    )


@pytest.mark.level("curvature", method="trust-ncg")
def test_pinn_hvp_matches_finite_differences(impl, observe, keras, float64, steps):
    """Hessian-vector products of the PINN loss (a fourth derivative of the network) through trust-ncg."""
    problem, call, w, layout = _pinn_call(impl, observe, keras, "trust-ncg", steps, "Hessian-vector products")
    p = np.random.default_rng(19).normal(size=w.size)
    probes.require_float64_vector(call.gradient(w), steps, "the gradient handed to scipy",
                                  "So Hessian-vector products cannot be checked against its float64 finite differences "
                                  "(they would difference float32 rounding noise).")
    hp = call.hvp(w, p)
    probes.require_float64_vector(hp, steps, "trust-ncg: the Hessian-vector product",
                                  "Compute it in the model's dtype.")
    fd = directional(call.gradient, w, p, steps.h_hvp)
    known = {"-H(x) p (wrong sign)": -fd, "2 H(x) p (wrong scale)": 2 * fd, "H(x) p / 2 (wrong scale)": 0.5 * fd}
    if not layout:
        known["the Gauss-Newton product 2 J^T J p of the residuals (an approximation, not the Hessian)"] = \
            problem.gauss_newton_product(w, p)
    close_vector(
        hp,
        fd,
        rtol=steps.rtol,
        atol=steps.atol,
        what="trust-ncg: the Hessian-vector product H(x) p",
        truth=FD_GRAD,
        why=f"the product is not the exact Hessian of the objective times p ({PINN}).{layout}",
        known=known,
    )
