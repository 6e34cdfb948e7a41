"""The other libraries' L-BFGS runs minimize the workload's own loss and stop at a target.

Each contender is optional: its cases skip, with the reason, when its package is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from keras_opt_ref import TensorFlowObjective
from keras_opt_ref.bench import alternatives, workloads


@pytest.fixture(params=alternatives.CONTENDERS)
def contender(request):
    reason = alternatives.skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.mark.parametrize("case", [("mlp", "small"), ("factorization", "tiny")], ids="-".join)
def test_contender_minimizes_the_workload_loss_and_stops_at_a_target(keras, case, contender):
    w = workloads.make_workload(*case, keras=keras)
    judge = TensorFlowObjective(w.model, w.x, w.y)
    runner = alternatives.make_contender(contender, w, maxiter=20)
    start = judge.value(runner.x0)
    full = runner.run()
    assert full.x.shape == (judge.size,) and 0 < full.nit <= 20, full
    assert full.loss < 0.9 * start, f"{contender} on {w.label}: {start} -> {full.loss} ({full.message})"
    assert full.loss == pytest.approx(judge.value(full.x), rel=1e-4), "its loss is not the model's at its weights"
    np.testing.assert_array_equal(runner.run().x, full.x, err_msg="runs from the same start must repeat")
    target = start - 0.5 * (start - full.loss)
    stopped = runner.run(target)
    assert stopped.loss <= target < start, (stopped, target)
    assert stopped.nit < full.nit, f"{contender} went on past the target: {stopped.nit} of {full.nit} iterations"


def test_unknown_contender_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        alternatives.skip_reason("scipy")
