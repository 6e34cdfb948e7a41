"""The benchmark harness measures what it says: its baselines compute the same objective."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from keras_opt_ref import TensorFlowObjective, scipy_optimizer
from keras_opt_ref.bench import baselines, measure, workloads


def _assert_same_objective(objective, other):
    """``other.value_and_grad`` agrees with the reference at a point away from the start."""
    x = objective.flat.read() + 0.1 * np.random.default_rng(0).normal(size=objective.size)
    f, g = objective.value_and_grad(x)
    f_other, g_other = other.value_and_grad(x)
    assert f == pytest.approx(f_other, rel=1e-5)
    np.testing.assert_allclose(g, g_other, rtol=1e-4, atol=1e-6 * np.abs(g).max())


@pytest.mark.parametrize("bias", [False, True])
def test_hand_written_factorization_matches_the_reference(keras, bias):
    data = workloads.factorization_data(*workloads.FACTORIZATION_SIZES["tiny"])
    model = workloads.factorization_model(keras, data.n_users, data.n_items, bias=bias)
    model.compile(loss="mse")
    objective = TensorFlowObjective(model, data.x, data.ratings)
    _assert_same_objective(objective, baselines.HandWrittenFactorization(data, objective.flat))


def test_hand_written_linear_matches_the_reference(keras):
    w = workloads.make_workload("linear", "small", keras=keras)
    _assert_same_objective(TensorFlowObjective(w.model, w.x, w.y), baselines.HandWrittenLinear(w.x, w.y))


def test_per_batch_loop_computes_the_full_batch_objective(keras):
    data = workloads.factorization_data(*workloads.FACTORIZATION_SIZES["tiny"])
    model = workloads.factorization_model(keras, data.n_users, data.n_items)
    model.compile(loss="mse")
    objective = TensorFlowObjective(model, data.x, data.ratings)
    loop = baselines.PerBatchLoop(model, data.x, data.ratings, batch_size=32)  # 1000 rows: a last batch of 8
    _assert_same_objective(objective, loop)


def test_workloads_are_deterministic_and_sized(keras):
    a = workloads.make_workload("factorization", "small", keras=keras)
    b = workloads.make_workload("factorization", "small", keras=keras)
    users, items, ratings = workloads.FACTORIZATION_SIZES["small"]
    assert a.num_samples == ratings and a.label == "factorization-small"
    np.testing.assert_array_equal(a.factorization.users, b.factorization.users)
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    pairs = a.factorization.users[:, 0].astype(np.int64) * items + a.factorization.items[:, 0]
    assert np.unique(pairs).size == ratings, "observed entries must not repeat"
    mlp = workloads.make_workload("mlp", "medium", keras=keras)
    assert sum(int(np.prod(v.shape)) for v in mlp.model.trainable_variables) == 2689
    with pytest.raises(ValueError, match="choose one of"):
        workloads.make_workload("resnet")
    with pytest.raises(ValueError, match="choose one of"):
        workloads.make_workload("mlp", "huge")


def test_time_to_target_and_stats():
    trace = np.array([[0.0, math.nan], [0.5, 3.0], [1.0, 1.0], [2.0, 0.5]])
    assert measure.time_to_target(trace, 1.0) == 1.0
    assert measure.time_to_target(trace, 0.1) != measure.time_to_target(trace, 0.1)  # nan: never reached
    s = measure.Stat.of([3.0, 1.0, 2.0])
    assert (s.median, s.lo, s.hi) == (2.0, 1.0, 3.0) and str(s) == "2 [1-3]"


def test_result_trace_is_the_optimization_history(keras):
    w = workloads.make_workload("linear", "small", keras=keras)
    w.model.train_function = scipy_optimizer.make_train_function(w.model, method="L-BFGS-B", maxiter=15)
    w.model.fit(w.x, w.y, batch_size=w.num_samples, verbose=0)
    result = w.model.train_function.result
    trace = result.trace
    assert trace.shape == (result.nit + 2, 2), "start, one row per iteration, final"
    assert np.all(np.diff(trace[:, 0]) >= 0), "seconds must not go back"
    assert trace[-1, 1] == result.fun
    losses = trace[1:, 1]
    assert np.all(np.diff(losses) <= 1e-12 * np.abs(losses[:-1])), "L-BFGS-B's iterates decrease the loss"


def test_floor_is_the_objective_at_the_current_weights(keras):
    w = workloads.make_workload("mlp", "small", keras=keras)
    objective = TensorFlowObjective(w.model, w.x, w.y)
    f_floor, g_floor = measure.floor_function(objective)()
    f, g = objective.value_and_grad(objective.flat.read())
    assert f_floor == pytest.approx(f, rel=1e-6)
    np.testing.assert_allclose(g_floor, g, rtol=1e-5, atol=1e-7)


def test_same_math_costs_report_every_ratio(keras):
    w = workloads.make_workload("linear", "small", keras=keras)
    costs = measure.same_math_costs(w, rounds=1, repeat=1)
    for key in ("reference loss+grad s", "reference hvp s", "hvp / loss+grad", "loss+grad / best same-math",
                "hvp / best same-math hvp", "best same-math hvp / loss+grad", "loss+grad / tensorflow same-math"):
        assert costs[key].median > 0, key
    best = costs["best loss+grad s"].median
    assert best <= costs["tensorflow loss+grad s"].median, "best is the faster backend, round by round"


def test_a_function_compiled_per_input_value_is_caught():
    seen = set()

    def specializing(x, p):  # fast at known values, slow (a compilation) at new ones
        key = (x.tobytes(), p.tobytes())
        if key not in seen:
            seen.add(key)
            time.sleep(0.3)

    times = {"specializing": np.array([1e-4]), "plain": np.array([1e-4])}
    with pytest.raises(RuntimeError, match="compiles per input value"):
        measure._check_compiled_once({"specializing": specializing}, times, np.zeros(3))
    measure._check_compiled_once({"plain": lambda x, p: None}, times, np.zeros(3))


@pytest.mark.slow
def test_the_pinn_race_runs_each_contender_in_its_own_process_and_takes_ratios(tmp_path):
    """Each contender's row comes from a child process (its own pid) and its ratio is its seconds over the
    reference's on TensorFlow; a contender that cannot reach the target gives no seconds and no ratio."""
    import os

    from keras_opt_ref.bench import pinn_timing

    lines = []
    race = pinn_timing.race("poisson1d", "small", target=0.05, contenders=("adam", "adam+reference", "adam+tfp"),
                            backends=("tensorflow",), adam_epochs=5, maxiter=400, check_every=5, say=lines.append)
    rows = race["rows"]
    assert list(rows) == ["adam+reference (tensorflow)", "adam", "adam+tfp"], rows
    reference = rows["adam+reference (tensorflow)"]
    assert reference["seconds"] is not None and reference["error"] <= 0.05, reference
    assert reference["/ reference"] == pytest.approx(1.0)
    for row in rows.values():
        if "skipped" in row:
            continue
        assert (row["seconds"] is None) == (row["error"] > 0.05) == (row["/ reference"] is None), row
        if row["seconds"] is not None:
            assert row["/ reference"] == pytest.approx(row["seconds"] / reference["seconds"])
            assert 0 < row["seconds"] <= row["total seconds"]
    assert len({row["pid"] for row in rows.values() if "pid" in row} | {os.getpid()}) == 1 + sum(
        "pid" in row for row in rows.values())
    assert len(lines) == 3


@pytest.mark.slow
def test_the_order_verdict_compares_the_orders_noise_bands():
    from keras_opt_ref.bench.side_by_side import order_verdict

    reference = [[1.0, 1.1, 1.2], [0.9, 1.0, 1.3]]
    same = order_verdict([[0.5, 0.55, 0.6], [0.45, 0.5, 0.7]], reference)
    assert same["/ reference"] == [pytest.approx(0.55 / 1.1), pytest.approx(0.5 / 1.0)]
    assert same["/ reference band"][0] == [pytest.approx(0.5 / 1.2), pytest.approx(0.6 / 1.0)]
    assert same["orders agree"] is True
    # A contender twice as slow in the second order, beyond both orders' spreads.
    moved = order_verdict([[0.5, 0.52, 0.54], [1.2, 1.25, 1.3]], [[1.0, 1.02, 1.04], [1.0, 1.01, 1.02]])
    assert moved["orders agree"] is False
    assert order_verdict([[math.nan], [0.5]], reference)["orders agree"] is None
    assert order_verdict(reference, reference)["orders agree"] is True


def test_the_side_by_side_runs_each_contender_in_its_own_process_in_both_orders():
    """Each contender's row comes from a process of its own; its seconds to the target are taken in both orders
    of the contenders, and its ratio per order is its median over the TensorFlow reference's; the target is
    reached by each contender that got below a tenth of the start."""
    import os

    from keras_opt_ref.bench import side_by_side

    contenders = ("reference (tensorflow)", "jaxopt")
    result = side_by_side.side_by_side("mlp", "small", maxiter=60, rounds=2, processes=1, contenders=contenders,
                                       say=lambda line: None)
    rows = {c: row for c, row in result["rows"].items() if c not in result["skipped"]}
    assert "reference (tensorflow)" in rows
    assert len({row["pid"] for row in rows.values()} | {os.getpid()}) == len(rows) + 1
    reference = rows["reference (tensorflow)"]
    assert reference["/ reference"] == [pytest.approx(1.0)] * 2
    for row in rows.values():
        assert len(row["s to target"]) == 2 and all(len(times) == 2 for times in row["s to target"])
        assert row["nfev"] >= row["nit"] > 0 and row["evaluations per iteration"] == row["nfev"] / row["nit"]
        if row["final loss"] <= result["start"] / 10:
            assert row["final loss"] <= result["target"] and all(np.isfinite(row["median s to target"])), row
            medians = zip(row["median s to target"], reference["median s to target"], strict=True)
            assert row["/ reference"] == [pytest.approx(m / r) for m, r in medians]
            assert row["orders agree"] in (True, False)
    assert len(side_by_side.table(result)) == 2 + len(rows)
