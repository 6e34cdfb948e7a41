"""pytest-benchmark: the same measurements as the asv suite, grouped per workload.

``extra_info`` carries the ratios (to the floor, to a gradient, to the alternatives) and the
run counts, so that ``--benchmark-json`` / ``--benchmark-autosave`` keep them beside the
timings for ``--benchmark-compare``. With ``--benchmark-disable`` every benchmark runs once,
untimed (CI), and the ratios are measured with a single round.

This folder has no ``__init__.py`` on purpose: asv discovers its suite by importing every module of
the ``benchmarks`` package, and its environments have no pytest. ``benchmarks._common`` is importable
here because pytest puts the repository root on ``sys.path`` for ``benchmarks/conftest.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks._common import ADAM_SECONDS, RUN_MAXITER, SIZES, WORKLOADS
from keras_opt_ref import TensorFlowObjective, backends
from keras_opt_ref.bench import alternatives, baselines, measure, pinn, pinn_timing, same_math, side_by_side, workloads


def _rounds(benchmark, timed: int) -> int:
    return 1 if benchmark.disabled else timed


def _stats(costs):
    return {k: {"median": v.median, "min": v.lo, "max": v.hi} for k, v in costs.items()}


@pytest.fixture(scope="module")
def objectives():
    cache = {}

    def get(name, size):
        if (name, size) not in cache:
            w = workloads.make_workload(name, size)
            cache[(name, size)] = (w, TensorFlowObjective(w.model, w.x, w.y))
        return cache[(name, size)]

    return get


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", WORKLOADS)
def test_floor(benchmark, objectives, name, size):
    w, objective = objectives(name, size)
    benchmark.group = f"evaluation {w.label}"
    benchmark(measure.floor_function(objective))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", WORKLOADS)
def test_loss_and_gradient(benchmark, objectives, name, size):
    w, objective = objectives(name, size)
    benchmark.group = f"evaluation {w.label}"
    costs = measure.evaluation_costs(w, rounds=_rounds(benchmark, 9), repeat=_rounds(benchmark, 5))
    benchmark.extra_info.update(_stats(costs))
    point = measure.cycling_points(objective.flat.read(), 7)
    f, g = benchmark(lambda: objective.value_and_grad(point()))
    assert math.isfinite(f) and g.shape == (objective.size,)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", WORKLOADS)
def test_hvp(benchmark, objectives, name, size):
    w, objective = objectives(name, size)
    benchmark.group = f"evaluation {w.label}"
    x0 = objective.flat.read()
    p = np.random.default_rng(1).normal(size=x0.size)
    hp = benchmark(lambda: objective.hessp(x0, p))
    assert np.all(np.isfinite(hp))


@pytest.fixture(scope="module")
def same_math_costs():
    """:func:`measure.same_math_costs` once per workload (it times every backend together)."""
    cache = {}

    def get(w, rounds):
        if w.label not in cache:
            cache[w.label] = measure.same_math_costs(w, rounds=rounds, repeat=rounds)
        return cache[w.label]

    return get


@pytest.mark.parametrize("backend", measure.SAME_MATH_BACKENDS)
@pytest.mark.parametrize("name", WORKLOADS)
def test_same_math(benchmark, objectives, same_math_costs, name, backend):
    """The same math by hand on a flat vector: its loss+gradient timed; the reference's ratios to it."""
    if same_math.backend_skip_reason(backend):
        pytest.skip(same_math.backend_skip_reason(backend))
    w, objective = objectives(name, "medium")
    benchmark.group = f"same math {w.label}"
    costs = same_math_costs(w, _rounds(benchmark, 9))
    benchmark.extra_info.update(_stats({k: v for k, v in costs.items() if backend in k or "best" in k
                                        or k.startswith("reference") or k == "hvp / loss+grad"}))
    fn = same_math.same_math(w, backend)
    x0 = objective.flat.read()
    assert fn.value(x0) == pytest.approx(objective.value(x0), rel=1e-5), "not the reference's loss"
    point = measure.cycling_points(x0, 7)
    f, g = benchmark(lambda: fn.value_and_grad(point()))
    assert math.isfinite(f) and g.shape == (objective.size,)


def test_dense_hessian_small_mlp(benchmark, objectives):
    w, objective = objectives("mlp", "small")
    benchmark.group = "dense Hessian mlp-small"
    costs = measure.evaluation_costs(w, rounds=_rounds(benchmark, 3), dense_hessian=True)
    benchmark.extra_info.update(_stats(costs))
    x0 = objective.flat.read()
    h = benchmark.pedantic(objective.hessian, args=(x0,), rounds=_rounds(benchmark, 3), iterations=1)
    np.testing.assert_allclose(h, h.T)


@pytest.mark.parametrize("name", ["linear", "factorization"])
def test_hand_written(benchmark, objectives, name):
    w, objective = objectives(name, "medium")
    benchmark.group = f"alternatives {w.label}"
    costs = measure.hand_written_costs(w, rounds=_rounds(benchmark, 9), repeat=_rounds(benchmark, 5))
    benchmark.extra_info.update(_stats(costs))
    manual = measure.hand_written(w, objective.flat)
    point = measure.cycling_points(objective.flat.read(), 7)
    benchmark(lambda: manual.value_and_grad(point()))


def test_per_batch_loop(benchmark):
    w = workloads.make_workload("factorization", "medium")
    benchmark.group = f"alternatives {w.label}"
    costs = measure.per_batch_loop_costs(w, rounds=_rounds(benchmark, 3))
    benchmark.extra_info.update(_stats(costs))
    loop = baselines.PerBatchLoop(w.model, w.x, w.y, batch_size=32)
    point = measure.cycling_points(loop.flat.read(), 3)
    benchmark.pedantic(lambda: loop.value_and_grad(point()), rounds=_rounds(benchmark, 3), iterations=1)


@pytest.mark.parametrize("method", measure.RUN_METHODS)
@pytest.mark.parametrize("name", WORKLOADS)
def test_run(benchmark, name, method):
    benchmark.group = f"runs {name}-medium"
    if measure.skip_reason(name, method):
        pytest.skip(measure.skip_reason(name, method))
    runs = []

    def run():
        runs.append(measure.run_method(workloads.make_workload(name, "medium"), method, maxiter=RUN_MAXITER))

    benchmark.pedantic(run, rounds=_rounds(benchmark, 3), iterations=1)
    last = runs[-1]
    benchmark.extra_info.update(
        nit=last.nit, nfev=last.nfev, njev=last.njev, nhev=last.nhev, final_loss=last.loss, message=last.message
    )
    assert math.isfinite(last.loss) and last.loss <= last.start_loss, (last.start_loss, last.loss, last.message)


def test_time_to_target(benchmark):
    benchmark.group = "time to target factorization-medium"
    out = {}

    def time_to_target():
        configs = ((256, 1e-2),) if benchmark.disabled else ((64, 1e-2), (256, 1e-2), (1024, 1e-2))
        adam, config, _ = measure.adam_reference("medium", seconds=ADAM_SECONDS, configs=configs)
        target = float(np.nanmin(adam[:, 1]))
        out.update(target=target, adam_seconds=measure.time_to_target(adam, target), adam_config=list(config))
        for method in ("L-BFGS-B", "CG", "Newton-CG", "trust-ncg", "trust-krylov"):
            run = measure.run_method(workloads.make_workload("factorization", "medium"), method, maxiter=RUN_MAXITER)
            out[method] = measure.time_to_target(run.trace, target)

    benchmark.pedantic(time_to_target, rounds=1, iterations=1)
    best = min((v for k, v in out.items() if k in measure.RUN_METHODS and math.isfinite(v)), default=math.nan)
    out["best_over_adam"] = best / out["adam_seconds"]
    benchmark.extra_info.update(out)


@pytest.fixture(scope="module")
def alternatives_comparison():
    """:func:`side_by_side.side_by_side` once per workload: each contender in its own process (the fair table;
    the target is common to all contenders)."""
    cache = {}

    def get(name, rounds):
        if name not in cache:
            cache[name] = side_by_side.side_by_side(name, "medium", maxiter=RUN_MAXITER, rounds=rounds,
                                                    orders=1 if rounds == 1 else 2, processes=1,
                                                    say=lambda line: None)
        return cache[name]

    return get


@pytest.mark.parametrize("contender", alternatives.CONTENDERS)
@pytest.mark.parametrize("name", ["mlp", "factorization"])
def test_alternative_time_to_target(benchmark, alternatives_comparison, name, contender):
    """Another library's L-BFGS against the reference: seconds to the common target in the fair side-by-side
    (extra_info, with their ratio), and the library's own run timed here."""
    if alternatives.skip_reason(contender):
        pytest.skip(alternatives.skip_reason(contender))
    benchmark.group = f"time to target, L-BFGS libraries, {name}-medium"
    comparison = alternatives_comparison(name, _rounds(benchmark, 3))
    row, ref = comparison["rows"][contender], comparison["rows"]["reference (tensorflow)"]
    assert "failed" not in row and "failed" not in ref, (row, ref)
    benchmark.extra_info.update({**row, "target": comparison["target"], "reference": ref})
    runner = alternatives.make_contender(contender, workloads.make_workload(name, "medium"), RUN_MAXITER)
    runner.run()  # tracing and compilation: not timed
    run = benchmark.pedantic(runner.run, args=(comparison["target"],), rounds=_rounds(benchmark, 3), iterations=1)
    # A contender that stalls (the target ignores it) is timed to its own stop: reached is then False.
    benchmark.extra_info["reached"] = bool(run.loss <= comparison["target"])
    assert math.isfinite(run.loss) and run.loss < comparison["start"], f"{contender} did not decrease the loss: {run}"


def _jsonable(value):
    return {"median": value.median, "min": value.lo, "max": value.hi} if isinstance(value, measure.Stat) else value


@pytest.mark.parametrize("factor", [1, 4, 16])
def test_scaling(benchmark, factor):
    benchmark.group = "scaling factorization"
    rows = []
    benchmark.pedantic(lambda: rows.extend(measure.scaling([factor])), rounds=1, iterations=1)
    benchmark.extra_info.update(rows[-1])
    assert rows[-1]["seconds per evaluation"] > 0


def test_least_squares_comparison(benchmark):
    """Does Levenberg-Marquardt pay off on the MLP? Seconds to a common target, side by side."""
    benchmark.group = "least squares mlp-medium"
    out = {}

    def least_squares():
        # lm's MINPACK QR of the 5000 x 2689 Jacobian takes ~17 s per evaluation here: CI runs one.
        maxiter = 1 if benchmark.disabled else 10
        target, rows = measure.least_squares_comparison("medium", maxiter=maxiter)
        out["target"] = target
        for label, r, t in rows:
            out[label] = {"seconds": r.seconds, "nit": r.nit, "nfev": r.nfev, "njev": r.njev, "nhev": r.nhev,
                          "final_loss": r.loss, "seconds_to_target": t}

    benchmark.pedantic(least_squares, rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    assert all(math.isfinite(row["final_loss"]) for k, row in out.items() if k != "target")


def test_plot_writes_a_png(tmp_path):
    """The figure of ``keras-opt-ref bench``, from synthetic traces (nothing timed)."""
    trace = np.array([[0.0, np.nan], [0.1, 1.0], [0.5, 0.1], [1.0, 0.01]])
    run = measure.Run("factorization-medium", "L-BFGS-B", 1.0, 3, 4, 4, 0, 1.0, 0.01, "ok", trace)
    path = tmp_path / "measure.png"
    measure._plot([run], np.array([[0.0, 1.0], [2.0, 0.05]]), (256, 1e-2), 0.05, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("size", ["small", "medium"])
@pytest.mark.parametrize("name", pinn.PINNS)
def test_pinn_loss_and_gradient(benchmark, name, size):
    """The reference's loss and gradient on a PINN (a third derivative of the network)."""
    benchmark.group = "PINN loss+grad"
    work = pinn.make_pinn(name, size)
    objective = backends.make_objective(work.model, work.x, work.y)
    x = objective.flat.read()
    objective.value_and_grad(x)  # tracing and compilation: not timed

    def evaluate():
        objective.forget()
        return objective.value_and_grad(x)

    f, g = benchmark.pedantic(evaluate, rounds=_rounds(benchmark, 20), iterations=1)
    assert math.isfinite(f) and np.all(np.isfinite(g))


_PINN_RUN = {"name": "poisson2d", "size": "small", "target": 1e-2, "adam_epochs": 100 if ADAM_SECONDS >= 10 else 5,
             "maxiter": 5000 if RUN_MAXITER >= 200 else RUN_MAXITER, "check_every": 10,
             "adam_alone_steps": 3000 if RUN_MAXITER >= 200 else RUN_MAXITER, "timeout": 1800.0}


@pytest.fixture(scope="module")
def pinn_reference():
    """The reference on TensorFlow, in its own process, once: the denominator of every ratio."""
    cache = {}

    def get():
        if not cache:
            cache.update(pinn_timing.in_a_process("adam+reference", "tensorflow", **_PINN_RUN))
        return cache

    return get


@pytest.mark.parametrize("contender", [c for c in pinn_timing.CONTENDERS if c != "adam+reference"]
                         + [f"adam+reference ({b})" for b in pinn_timing.REFERENCE_BACKENDS])
def test_pinn_time_to_error(benchmark, pinn_reference, contender):
    """Seconds to a relative L2 error of 1e-2 on poisson2d-small, each contender in its own process (timed:
    the whole process); the seconds to the error and their ratio to the reference on TensorFlow in extra_info."""
    benchmark.group = "PINN time to error, poisson2d-small"
    name, backend = (contender.split(" (")[0], contender.split(" (")[1][:-1]) if "(" in contender else (
        contender, "tensorflow")
    reason = pinn_timing.skip_reason(name, backend)
    if reason:
        pytest.skip(reason)
    row = benchmark.pedantic(pinn_timing.in_a_process, args=(name, backend), kwargs=_PINN_RUN, rounds=1,
                             iterations=1)
    assert "failed" not in row, row
    reference = pinn_reference()
    ratio = (row["seconds"] / reference["seconds"] if row["seconds"] is not None and reference.get("seconds")
             else None)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "contender"}, over_reference=ratio)
    assert math.isfinite(row["error"]) and row["steps"] > 0, row
