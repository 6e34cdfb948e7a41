"""Physics-informed objectives (keras_opt_ref.bench.pinn): losses through the network's input derivatives.

On whichever backend the run has (Keras 3 on TensorFlow, JAX or torch; tf-keras), for every workload: the
objective's value is the model's own ``compute_loss`` over all collocation points, called directly; its
gradient (a third derivative of the network), HVP (a fourth) and, for poisson1d, dense Hessian match central
differences; short L-BFGS-B runs approach the reference solutions. The Cole-Hopf solution of Burgers'
equation is checked against its initial and boundary values, the PDE by finite differences, and a published
value. The example script and ``time_to_error`` are TensorFlow code and skip elsewhere. In the slow tier
(tox envs slow, slow-legacy, keras3-jax, keras3-torch).
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_opt_ref_conformance.truth import directional

from keras_opt_ref import backends, scipy_optimizer
from keras_opt_ref.base.keras_compat import default_keras
from keras_opt_ref.bench import pinn

pytestmark = pytest.mark.slow


# Finite differences per working precision (the fixture ``fd``). TensorFlow computes these float64 models in
# float64: 2-point differences at h = 1e-6 are exact to below 1e-8 relative. Keras 3.15.1 computes parts of a
# float64 model in float32 on JAX (tanh, sin, mean) and on torch (matmul, hence Dense, and mean): the
# float64 "model" then carries float32 rounding noise of ~1e-7 relative, which a step h turns into ~1e-7 / h
# in a difference quotient, while the 2-point truncation error grows as h^2 (1.3e-3 relative at h = 3e-3 on
# burgers1d in float64). The five-point stencil at h = 3e-3 has truncation O(h^4), measured below 1.3e-5 in
# float64 on all three workloads, and rounding noise measured up to 3.7e-4 (gradients) and 3.3e-5 (HVPs) on
# JAX and torch; rtol 1e-3 holds that with a margin and still catches a dropped or mis-signed term, a wrong
# factor or a missing part of the data (each changes the derivative by far more than 1e-3).
DIFFERENCES = {
    "float64": {"h": 1e-6, "five_point": False, "value": 1e-12, "rtol": 1e-6, "hvp": (1e-5, 1e-6),
                "hessian": (1e-4, 1e-5), "exact": 1e-10},
    "float32": {"h": 3e-3, "five_point": True, "value": 1e-6, "rtol": 1e-3, "hvp": (1e-3, 1e-3),
                "hessian": (1e-2, 1e-3), "exact": 1e-5},
}


@pytest.fixture(scope="module")
def fd():
    """The differences for the precision a float64 PINN really computes in here: its network's output
    against the same network evaluated in NumPy float64."""
    keras = default_keras()
    work = pinn.make_pinn("poisson1d", "small", keras=keras)
    x = np.linspace(0.0, 1.0, 50)[:, None]
    h = x
    for i, layer in enumerate(work.model.net.layers):
        kernel, bias = layer.get_weights()
        h = h @ kernel + bias
        h = np.tanh(h) if i + 1 < len(work.model.net.layers) else h
    out = np.asarray(work.model.predict_on_batch(x), dtype=np.float64)
    keras.backend.clear_session()
    return DIFFERENCES["float64" if np.max(np.abs(out - h)) <= 1e-13 * np.max(np.abs(h)) else "float32"]


def along(f, x: np.ndarray, p: np.ndarray, fd: dict) -> np.ndarray:
    """The derivative of ``f`` at ``x`` along ``p`` by central differences (2-point, or five-point: ``fd``)."""
    if not fd["five_point"]:
        return directional(f, x, p, fd["h"])
    return (4 * directional(f, x, p, fd["h"]) - directional(f, x, p, 2 * fd["h"])) / 3


def as_float(keras, tensor) -> float:
    return float(keras.ops.convert_to_numpy(tensor) if hasattr(keras, "ops") else tensor)


def tensorflow_only(keras, what: str) -> None:
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"{what} is TensorFlow code (tf.GradientTape, tf.function); this run is on "
                    f"{keras.backend.backend()}")


@pytest.mark.parametrize("name", pinn.PINNS)
def test_value_gradient_hvp_and_hessian_against_finite_differences(keras, fd, name):
    work = pinn.make_pinn(name, "small", keras=keras)
    objective = backends.make_objective(work.model, work.x, work.y)
    x0 = objective.flat.read()
    direct = as_float(keras, work.model.compute_loss(x=work.x, y=work.y))  # Keras's own loss, all points at once
    # float32 arithmetic: the objective's compiled evaluation and this eager one may round differently
    assert objective.value(x0) == pytest.approx(direct, rel=fd["value"])
    rng = np.random.default_rng(1)
    f, g = objective.value_and_grad(x0)
    for _ in range(3):
        p = rng.normal(size=x0.size)
        assert g @ p == pytest.approx(float(along(objective.value, x0, p, fd)), rel=fd["rtol"])
        hp = objective.hessp(x0, p)
        rtol, atol = fd["hvp"]
        np.testing.assert_allclose(hp, along(objective.gradient, x0, p, fd), rtol=rtol, atol=atol * np.max(np.abs(hp)))
    if name == "poisson1d":  # 321 weights: the dense Hessian, against differences of the gradient
        hessian = objective.hessian(x0)
        scale = np.max(np.abs(hessian))
        np.testing.assert_allclose(hessian, hessian.T, rtol=fd["exact"], atol=fd["exact"] * scale)
        np.testing.assert_allclose(hessian @ p, hp, rtol=fd["exact"], atol=fd["exact"] * np.max(np.abs(hp)))
        columns = np.stack([along(objective.gradient, x0, e, fd) for e in np.eye(x0.size)], axis=1)
        rtol, atol = fd["hessian"]
        np.testing.assert_allclose(hessian, columns, rtol=rtol, atol=atol * scale)


# poisson1d reaches the closed form; Burgers' error is dominated by the shock at x = 0, which a PINN resolves
# slowly: 200 iterations take it from above 1 to about 0.3-0.4 (docs/pinn.md has a longer run).
@pytest.mark.parametrize("name, maxiter, start_above, end_below", [("poisson1d", 400, 0.5, 5e-3),
                                                                    ("burgers1d", 200, 0.9, 0.6)])
def test_lbfgs_approaches_the_reference_solution(keras, name, maxiter, start_above, end_below):
    work = pinn.make_pinn(name, "small", keras=keras)
    before = pinn.relative_l2_error(work)
    work.model.train_function = scipy_optimizer.make_train_function(work.model, method="L-BFGS-B", maxiter=maxiter)
    work.model.fit(work.x, work.y, batch_size=len(work.x), verbose=0)
    after = pinn.relative_l2_error(work)
    assert before > start_above and after < end_below, (before, after, work.model.train_function.result.message)


def test_cole_hopf_solution_meets_the_initial_and_boundary_conditions():
    x = np.linspace(-1.0, 1.0, 41)
    np.testing.assert_allclose(pinn.burgers_solution(0.0, x), -np.sin(np.pi * x), rtol=0, atol=1e-14)
    t = np.linspace(0.0, 1.0, 21)
    np.testing.assert_allclose(pinn.burgers_solution(t, -1.0), 0.0, atol=1e-12)
    np.testing.assert_allclose(pinn.burgers_solution(t, 1.0), 0.0, atol=1e-12)


def test_cole_hopf_solution_satisfies_burgers_equation_away_from_the_shock():
    # Central differences on a grid away from the shock at x = 0 (the solution is smooth there): truncation
    # h^2 times the fourth derivatives, rounding 1e-16 / h^2 in u_xx; both far below the viscous term.
    t, x = np.meshgrid(np.linspace(0.05, 0.95, 19), np.r_[np.linspace(-0.9, -0.2, 15), np.linspace(0.2, 0.9, 15)],
                       indexing="ij")
    h, u = 1e-4, pinn.burgers_solution
    u0 = u(t, x)
    u_t = (u(t + h, x) - u(t - h, x)) / (2 * h)
    u_x = (u(t, x + h) - u(t, x - h)) / (2 * h)
    u_xx = (u(t, x + h) - 2 * u0 + u(t, x - h)) / h**2
    residual = u_t + u0 * u_x - pinn.BURGERS_NU * u_xx
    viscous = pinn.BURGERS_NU * np.abs(u_xx)
    assert np.max(np.abs(residual)) < 1e-6 and np.max(viscous) > 1e-2, (np.max(np.abs(residual)), np.max(viscous))


def test_cole_hopf_solution_has_the_published_steepest_slope():
    # Basdevant et al., "Spectral and finite difference solutions of the Burgers equation", Computers & Fluids
    # 14 (1986): for this problem the largest |u_x| at x = 0 is 152.00516, reached at t = 1.6037 / pi.
    def slope(t: float) -> float:
        h = 1e-6
        return float((pinn.burgers_solution(t, h) - pinn.burgers_solution(t, -h)) / (2 * h))

    peak = 1.6037 / np.pi
    assert abs(slope(peak) + 152.00516) < 2e-5, slope(peak)
    assert abs(slope(peak - 0.005)) < abs(slope(peak)) and abs(slope(peak + 0.005)) < abs(slope(peak))


def test_burgers_error_grid_holds_the_reference_solution():
    grid, exact = pinn._grid("burgers1d", 11)  # columns (t, x)
    assert grid.shape == (11 * 21, 2) and grid[:, 0].min() == 0 and grid[:, 0].max() == 1
    assert grid[:, 1].min() == -1 and grid[:, 1].max() == 1
    np.testing.assert_allclose(exact[grid[:, 0] == 0, 0], -np.sin(np.pi * grid[grid[:, 0] == 0, 1]), atol=1e-14)


def test_the_example_trains_and_prints_its_errors(keras, tmp_path):
    import os
    import subprocess
    import sys

    tensorflow_only(keras, "examples/pinn_poisson.py")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "pinn_poisson.py")
    out = subprocess.run([sys.executable, script, "--adam-epochs", "5", "--maxiter", "800"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = [line for line in out.stdout.splitlines() if line.startswith("then L-BFGS-B")][-1]
    error = float(last.split("relative L2 error ")[1].split()[0])
    assert error < 0.05, last  # the default 2,000 iterations reach about 2e-3


@pytest.mark.parametrize("contender", ["adam+reference", "adam+hand-written"])
def test_time_to_error_stops_at_the_target(keras, contender):
    tensorflow_only(keras, "bench.pinn_timing.time_to_error")
    from keras_opt_ref.bench import pinn_timing

    row = pinn_timing.time_to_error(contender, "poisson1d", "small", target=0.05, adam_epochs=5, maxiter=400,
                                    check_every=5, keras=keras)
    assert row["seconds"] is not None and 0 < row["seconds"] < 120, row
    assert row["error"] <= 0.05 and row["steps"] % 5 == 0, row


@pytest.mark.parametrize("name", ["poisson2d", "burgers1d"])
def test_declared_mean_over_rows_chunks_the_pinn_exactly_and_sum_is_refused(keras, fd, name):
    """loss_over_rows="mean": the collocation points in chunks of 64 give the one-piece objective's value,
    gradient and HVP (the boundary term, the same in every chunk, counted once); "sum" counts the boundary
    term once per chunk and is refused before any evaluation."""
    import warnings

    work = pinn.make_pinn(name, "small", keras=keras)
    with pytest.raises(ValueError, match="loss_over_rows='sum' does not add up"):
        backends.make_objective(work.model, work.x, work.y, chunk_size=64, loss_over_rows="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # declared: no "evaluated in one piece" warning
        chunked = backends.make_objective(work.model, work.x, work.y, chunk_size=64, loss_over_rows="mean")
    with pytest.warns(UserWarning, match="evaluated in one piece"):
        whole = backends.make_objective(work.model, work.x, work.y, chunk_size=64)
    x = whole.flat.read() + 0.01 * np.random.default_rng(2).normal(size=whole.size)
    p = np.random.default_rng(3).normal(size=whole.size)
    rel = 1e-10 if fd is DIFFERENCES["float64"] else 1e-5  # summation order only
    f_chunked, g_chunked = chunked.value_and_grad(x)
    f_whole, g_whole = whole.value_and_grad(x)
    assert f_chunked == pytest.approx(f_whole, rel=rel)
    np.testing.assert_allclose(g_chunked, g_whole, rtol=rel * 100, atol=rel * np.max(np.abs(g_whole)))
    hp = whole.hessp(x, p)
    np.testing.assert_allclose(chunked.hessp(x, p), hp, rtol=rel * 100, atol=rel * 10 * np.max(np.abs(hp)))
