"""Physics-informed objectives (keras_opt_ref.bench.pinn): losses through the network's input derivatives.

The objective's value is the model's own ``compute_loss`` over all collocation points, called directly;
its gradient (a third derivative of the network), HVP (a fourth) and dense Hessian are checked against
float64 central differences; a short Adam-free L-BFGS-B run reaches the closed-form solution. TensorFlow
only (Keras 3 and tf-keras): the workloads write their input derivatives with tf.GradientTape. In the
slow tier: the default run is at its 15-minute budget.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_opt_ref_conformance.truth import central_jacobian, directional  # noqa: E402

from keras_opt_ref import backends, scipy_optimizer  # noqa: E402
from keras_opt_ref.bench import pinn, pinn_timing  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh(keras):
    if hasattr(keras, "ops") and keras.backend.backend() != "tensorflow":
        pytest.skip("the PINN workloads differentiate with tf.GradientTape")
    yield
    keras.backend.clear_session()


@pytest.mark.parametrize("name", pinn.PINNS)
def test_value_gradient_hvp_and_hessian_against_finite_differences(keras, name):
    work = pinn.make_pinn(name, "small", keras=keras)
    objective = backends.make_objective(work.model, work.x, work.y)
    x0 = objective.flat.read()
    direct = float(work.model.compute_loss(x=tf.constant(work.x), y=tf.constant(work.y)))
    assert objective.value(x0) == pytest.approx(direct, rel=1e-12)  # Keras's own loss, all points at once
    rng = np.random.default_rng(1)
    f, g = objective.value_and_grad(x0)
    for _ in range(3):
        p = rng.normal(size=x0.size)
        assert g @ p == pytest.approx(float(directional(objective.value, x0, p, h=1e-6)), rel=1e-6)
        hp = objective.hessp(x0, p)
        np.testing.assert_allclose(hp, directional(objective.gradient, x0, p, h=1e-6), rtol=1e-5,
                                   atol=1e-6 * np.max(np.abs(hp)))
    if name == "poisson1d":  # 321 weights: the dense Hessian, against differences of the gradient
        hessian = objective.hessian(x0)
        np.testing.assert_allclose(hessian, hessian.T, rtol=1e-10, atol=1e-10 * np.max(np.abs(hessian)))
        fd = central_jacobian(objective.gradient, x0, h=1e-6)
        np.testing.assert_allclose(hessian, fd, rtol=1e-4, atol=1e-5 * np.max(np.abs(hessian)))


def test_lbfgs_reaches_the_closed_form_solution(keras):
    work = pinn.make_pinn("poisson1d", "small", keras=keras)
    before = pinn.relative_l2_error(work)
    work.model.train_function = scipy_optimizer.make_train_function(work.model, method="L-BFGS-B", maxiter=400)
    work.model.fit(work.x, work.y, batch_size=len(work.x), verbose=0)
    after = pinn.relative_l2_error(work)
    assert before > 0.5 and after < 5e-3, (before, after, work.model.train_function.result.message)


def test_the_example_trains_and_prints_its_errors(tmp_path):
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "pinn_poisson.py")
    out = subprocess.run([sys.executable, script, "--adam-epochs", "5", "--maxiter", "800"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = [line for line in out.stdout.splitlines() if line.startswith("then L-BFGS-B")][-1]
    error = float(last.split("relative L2 error ")[1].split()[0])
    assert error < 0.05, last  # the default 2,000 iterations reach about 2e-3


@pytest.mark.parametrize("contender", ["adam+reference", "adam+hand-written"])
def test_time_to_error_stops_at_the_target(keras, contender):
    row = pinn_timing.time_to_error(contender, "poisson1d", "small", target=0.05, adam_epochs=5, maxiter=400,
                                    check_every=5, keras=keras)
    assert row["seconds"] is not None and 0 < row["seconds"] < 120, row
    assert row["error"] <= 0.05 and row["steps"] % 5 == 0, row
