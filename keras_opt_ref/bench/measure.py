"""The measurements behind asv, pytest-benchmark and ``keras-opt-ref bench``.

Every figure is a ratio to something measured in the same run. Timings are taken round by
round: within a round each contender is timed back to back (best of ``repeat`` calls), so
a ratio compares calls made under the same machine load; we report the median ratio over
the rounds with its min-max (:class:`Stat`).

The floor is one bare compiled TensorFlow value-and-gradient call on the same data with the
variables already set, float64 NumPy out, XLA as the objective uses it. A lower floor is the
same math written by hand as one jitted function of one flat vector (:mod:`.same_math`, on
TensorFlow and, where installed, JAX), which :func:`same_math_costs` times against the
reference's loss+gradient and HVP at the same float64 NumPy boundary.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from ..backends.tensorflow.flat import tf_variable
from ..backends.tensorflow.objective import TensorFlowObjective
from ..base import keras_compat as _keras
from ..scipy_optimizer import make_train_function
from . import baselines, boundary, same_math, workloads
from .side_by_side import time_to_target
from .timing import Stat, cycling_points, round_robin

__all__ = [
    "RUN_METHODS",
    "Run",
    "Stat",
    "adam_reference",
    "cycling_points",
    "evaluation_costs",
    "floor_function",
    "hand_written_costs",
    "least_squares_comparison",
    "per_batch_loop_costs",
    "round_robin",
    "run_method",
    "same_math_costs",
    "skip_reason",
    "scaling_probe",
    "time_to_target",
]

RUN_METHODS = ("L-BFGS-B", "CG", "BFGS", "Newton-CG", "trust-ncg", "trust-krylov", "lm", "trf", "dogbox")
# scipy's BFGS keeps a dense n x n inverse Hessian and updates it with n x n matrix products:
# O(n^3) per iteration. Measured here: 0.87 s per iteration at n = 2,689 (mlp-medium), 175 s
# for 200 iterations; at n = 48,000 (factorization) it would need 18 GB. Run on linear (101) only.


def skip_reason(workload_name: str, method: str) -> str | None:
    """Why a per-run benchmark is not run, or None. Only the linear workload is small enough
    for BFGS (see above) and for least squares in a routine run: on mlp-medium one
    lm iteration (MINPACK's QR of a 5000 x 2689 Jacobian) takes about 17 s, which
    :func:`least_squares_comparison` measures; the factorization has fewer ratings than weights."""
    if workload_name == "linear":
        return None
    if method == "BFGS":
        return "scipy's dense inverse-Hessian update is O(n^3) per iteration"
    if method in ("lm", "trf", "dogbox"):
        return "a dense QR per iteration; see the least-squares comparison"
    return None


def floor_function(objective: TensorFlowObjective) -> Callable[[], tuple[float, np.ndarray]]:
    """One bare compiled value-and-gradient call at the variables' current values."""
    model = objective.model
    tf_vars = [tf_variable(v) for v in objective.flat.variables]
    x, y, sample_weight = objective.data

    @tf.function(jit_compile=objective.jit_compile)
    def value_and_grad():
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=False), sample_weight=sample_weight)
        grads = tape.gradient(loss, tf_vars)
        return tf.cast(loss, tf.float64), objective.flat.concat(grads)

    def call() -> tuple[float, np.ndarray]:
        f, g = value_and_grad()
        return float(f), g.numpy()

    return call


def evaluation_costs(
    workload: workloads.Workload, *, rounds: int = 15, repeat: int = 5, dense_hessian: bool = False, **objective_kwargs
) -> dict[str, Stat]:
    """Seconds per floor, loss+gradient, HVP (and dense Hessian) call, and their ratios."""
    objective = TensorFlowObjective(workload.model, workload.x, workload.y, **objective_kwargs)
    floor = floor_function(objective)
    x0 = objective.flat.read()
    p = np.random.default_rng(1).normal(size=x0.size)
    point = cycling_points(x0, 7)
    fns = {
        "floor": floor,
        "loss+grad": lambda: objective.value_and_grad(point()),
        "hvp": lambda: objective.hessp(point(), p),
    }
    if dense_hessian:
        fns["hessian"] = lambda: objective.hessian(x0)
    t = round_robin(fns, rounds=rounds, repeat=1 if dense_hessian else repeat)
    out = {f"{name} s": Stat.of(v) for name, v in t.items()}
    out["loss+grad / floor"] = Stat.of(t["loss+grad"] / t["floor"])
    out["hvp / loss+grad"] = Stat.of(t["hvp"] / t["loss+grad"])
    if dense_hessian:
        out["hessian / loss+grad"] = Stat.of(t["hessian"] / t["loss+grad"])
    if objective.traces["value_and_grad"] != 1 or objective.traces["hvp"] != 1:
        raise RuntimeError(f"the objective retraced while being timed: {objective.traces}")
    return out


# The same math timed in this (TensorFlow) process; torch's, eager, is timed in its own process (.boundary).
SAME_MATH_BACKENDS = ("tensorflow", "jax")


def same_math_costs(
    workload: workloads.Workload, *, rounds: int = 15, repeat: int = 5, backends: Sequence[str] = SAME_MATH_BACKENDS
) -> dict[str, Stat]:
    """The reference's loss+gradient and HVP against the same math hand-written on a flat vector.

    Times, round by round, the reference's ``value_and_grad`` and ``hessp`` and each installed
    backend's :func:`.same_math.same_math` (missing ones are left out), all at distinct points
    near the start. Returns seconds per call (``"<who> loss+grad s"``, ``"<who> hvp s"``) and, for
    ``b`` each backend and ``"best"`` (per round, the faster backend): ``"loss+grad / b same-math"``,
    ``"hvp / b same-math hvp"``, ``"b same-math hvp / loss+grad"``; and the reference's ``"hvp / loss+grad"``.
    """
    objective = TensorFlowObjective(workload.model, workload.x, workload.y)
    x0 = objective.flat.read()
    p = np.random.default_rng(1).normal(size=x0.size)
    point = cycling_points(x0, 7)
    calls: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
        "reference loss+grad": lambda x, p: objective.value_and_grad(x),
        "reference hvp": objective.hessp,
    }
    available = [b for b in backends if not same_math.backend_skip_reason(b)]
    for b in available:
        fn = same_math.same_math(workload, b)
        calls[f"{b} loss+grad"] = lambda x, p, fn=fn: fn.value_and_grad(x)
        calls[f"{b} hvp"] = fn.hessp
    t = round_robin({name: lambda c=c: c(point(), p) for name, c in calls.items()}, rounds=rounds, repeat=repeat)
    _check_compiled_once(calls, t, x0)
    if available:
        t["best loss+grad"] = np.min([t[f"{b} loss+grad"] for b in available], axis=0)
        t["best hvp"] = np.min([t[f"{b} hvp"] for b in available], axis=0)
    out = {f"{name} s": Stat.of(v) for name, v in t.items()}
    out["hvp / loss+grad"] = Stat.of(t["reference hvp"] / t["reference loss+grad"])
    for b in [*available, "best"] if available else []:
        out[f"loss+grad / {b} same-math"] = Stat.of(t["reference loss+grad"] / t[f"{b} loss+grad"])
        out[f"hvp / {b} same-math hvp"] = Stat.of(t["reference hvp"] / t[f"{b} hvp"])
        out[f"{b} same-math hvp / loss+grad"] = Stat.of(t[f"{b} hvp"] / t[f"{b} loss+grad"])
    if objective.traces["value_and_grad"] != 1 or objective.traces["hvp"] != 1:
        raise RuntimeError(f"the objective retraced while being timed: {objective.traces}")
    return out


def _check_compiled_once(calls: dict[str, Callable[[np.ndarray, np.ndarray], Any]], times: dict[str, np.ndarray],
                         x0: np.ndarray) -> None:
    """Each call at a point and direction never seen before costs about what a timed call did.

    A function that XLA specializes on its input values (compiles again per value, and at values
    seen before returns a folded constant) is fast at the few cycled points of a benchmark; this
    is what tells it apart from a fast one.
    """
    rng = np.random.default_rng(12345)
    x, p = x0 + 1e-3 * rng.normal(size=x0.size), rng.normal(size=x0.size)
    for name, call in calls.items():
        start = time.perf_counter()
        call(x, p)
        seconds, typical = time.perf_counter() - start, float(np.median(times[name]))
        if seconds > 20 * typical + 0.1:
            raise RuntimeError(f"{name}: {seconds:.3f} s at a new point, {typical * 1e3:.3g} ms per timed call: it "
                               "compiles per input value, so its timing is not a per-call cost")


def per_batch_loop_costs(workload: workloads.Workload, *, batch_size: int = 32, rounds: int = 3) -> dict[str, Stat]:
    """Reference loss+gradient against a Python loop over mini-batches (the earlier designs)."""
    objective = TensorFlowObjective(workload.model, workload.x, workload.y)
    loop = baselines.PerBatchLoop(workload.model, workload.x, workload.y, batch_size=batch_size)
    point = cycling_points(objective.flat.read(), 5)
    t = round_robin(
        {"reference": lambda: objective.value_and_grad(point()), "loop": lambda: loop.value_and_grad(point())},
        rounds=rounds,
        repeat=1,
    )
    return {
        "reference s": Stat.of(t["reference"]),
        f"per-batch loop (batch {batch_size}) s": Stat.of(t["loop"]),
        "loop / reference": Stat.of(t["loop"] / t["reference"]),
    }


def hand_written(workload: workloads.Workload, flat: Any) -> Any:
    if workload.name == "linear":
        return baselines.HandWrittenLinear(workload.x, workload.y)
    if workload.name == "factorization":
        return baselines.HandWrittenFactorization(workload.factorization, flat)
    raise ValueError(f"no hand-written objective for {workload.name!r}; there is one for linear and factorization")


def hand_written_costs(workload: workloads.Workload, *, rounds: int = 15, repeat: int = 5) -> dict[str, Stat]:
    """Reference loss+gradient against analytic NumPy / scipy.sparse code for the same loss."""
    objective = TensorFlowObjective(workload.model, workload.x, workload.y)
    manual = hand_written(workload, objective.flat)
    point = cycling_points(objective.flat.read(), 7)
    t = round_robin(
        {
            "reference": lambda: objective.value_and_grad(point()),
            "hand-written": lambda: manual.value_and_grad(point()),
        },
        rounds=rounds,
        repeat=repeat,
    )
    return {
        "reference s": Stat.of(t["reference"]),
        "hand-written s": Stat.of(t["hand-written"]),
        "reference / hand-written": Stat.of(t["reference"] / t["hand-written"]),
    }


@dataclass
class Run:
    """One ``fit`` epoch of a scipy method: the counts, the final loss and the loss trace."""

    workload: str
    method: str
    seconds: float
    nit: int
    nfev: int
    njev: int
    nhev: int
    start_loss: float
    loss: float
    message: str
    trace: np.ndarray = field(repr=False)  # rows (seconds, loss)


def run_method(workload: workloads.Workload, method: str, maxiter: int = 200, **options: Any) -> Run:
    """Train the workload's model with one ``fit`` epoch of ``method`` (full batch)."""
    model = workload.model
    start_loss = model.evaluate(workload.x, workload.y, batch_size=workload.num_samples, verbose=0)
    model.train_function = make_train_function(model, method=method, maxiter=maxiter, **options)
    start = time.perf_counter()
    model.fit(workload.x, workload.y, batch_size=workload.num_samples, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    r = model.train_function.result
    return Run(
        workload.label, method, seconds, int(r.nit), int(r.nfev), int(r.njev), int(r.nhev), float(start_loss),
        float(r.fun), str(r.message), np.asarray(r.trace),
    )


# The least-squares comparison on the MLP (issue: does Levenberg-Marquardt pay off here?).
LEAST_SQUARES_CONTENDERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("lm", "lm", {}),
    ("trf", "trf", {}),
    ("trust-ncg, Gauss-Newton", "trust-ncg", {"hessian": "gauss-newton"}),
    ("trust-ncg, exact Hessian", "trust-ncg", {}),
    ("L-BFGS-B", "L-BFGS-B", {}),
)


def least_squares_comparison(
    size: str = "medium", maxiter: int = 10, minimize_maxiter: int | None = None
) -> tuple[float, list[tuple[str, Run, float]]]:
    """Each contender from the same start on the MLP, and the seconds each needs to reach a
    common target: the worse of the losses lm and trf reach in ``maxiter`` evaluations.

    The least-squares methods get ``maxiter`` evaluations (``max_nfev``); the minimize methods,
    whose iterations cost about a gradient each, get ``minimize_maxiter`` (30x by default).
    Returns the target and, per contender, its run and its seconds to the target.
    """
    minimize_maxiter = 30 * maxiter if minimize_maxiter is None else minimize_maxiter
    runs = []
    for label, method, options in LEAST_SQUARES_CONTENDERS:
        limit = maxiter if method in ("lm", "trf", "dogbox") else minimize_maxiter
        runs.append((label, run_method(workloads.make_workload("mlp", size), method, maxiter=limit, **options)))
    target = max(r.loss for label, r in runs if label in ("lm", "trf"))
    return target, [(label, r, time_to_target(r.trace, target)) for label, r in runs]


def adam_reference(
    size: str = "medium",
    *,
    seconds: float = 60.0,
    configs: Sequence[tuple[int, float]] = ((64, 1e-2), (256, 1e-2), (1024, 1e-2)),
) -> tuple[np.ndarray, tuple[int, float], dict[tuple[int, float], np.ndarray]]:
    """Mini-batch Adam on the factorization for ``seconds`` per (batch size, learning rate).

    Returns the best configuration's trace (rows: training seconds, full-batch loss), that
    configuration, and all traces. "Best" is the lowest full-batch loss reached.
    """
    traces = {}
    for batch_size, lr in configs:
        w = workloads.make_workload("factorization", size)
        objective = TensorFlowObjective(w.model, w.x, w.y)

        def full_batch_loss(objective=objective) -> float:
            return objective.value(objective.flat.read())

        traces[(batch_size, lr)] = baselines.adam_trace(
            w.model, w.x, w.y, full_batch_loss, seconds=seconds, batch_size=batch_size, learning_rate=lr
        )
    best = min(traces, key=lambda c: np.nanmin(traces[c][:, 1]))
    return traces[best], best, traces


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux ``VmHWM``; ``ru_maxrss`` elsewhere).

    ``ru_maxrss`` survives ``fork``/``exec`` on Linux, so a child started by a large parent
    would report the parent's peak; ``VmHWM`` belongs to the child's own address space.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scaling_probe(factor: int, *, chunk_size: int | None = None, evaluations: int = 20) -> dict[str, float]:
    """Seconds per loss+gradient and peak memory on the factorization with ``factor`` x the ratings.

    Users and items grow with ``sqrt(factor)`` so the density stays at 2%. Meant to run in a
    fresh process (see :func:`scaling`), so that the peak memory belongs to this size alone.
    """
    users, items, ratings = workloads.FACTORIZATION_SIZES["medium"]
    grow = math.sqrt(factor)
    data = workloads.factorization_data(int(users * grow), int(items * grow), ratings * factor)
    keras = _keras.default_keras()
    model = workloads.factorization_model(keras, data.n_users, data.n_items)
    model.compile(loss="mse")
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    objective = TensorFlowObjective(model, data.x, data.ratings, **kwargs)
    point = cycling_points(objective.flat.read(), 3)
    objective.value_and_grad(point())
    times = []
    for _ in range(evaluations):
        start = time.perf_counter()
        objective.value_and_grad(point())
        times.append(time.perf_counter() - start)
    return {
        "factor": factor,
        "ratings": ratings * factor,
        "weights": objective.size,
        "chunk_size": objective.chunk_size,
        "seconds per evaluation": float(np.median(times)),
        "peak RSS MiB": _peak_rss_mib(),
    }


def scaling(factors: Sequence[int] = (1, 4, 16), **kwargs: Any) -> list[dict[str, float]]:
    """:func:`scaling_probe` for each factor, each in its own Python process."""
    rows = []
    for factor in factors:
        args = json.dumps({"factor": factor, **kwargs})
        code = (
            "import json; from keras_opt_ref.bench import measure; "
            f"print(json.dumps(measure.scaling_probe(**json.loads({args!r}))))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ}
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def summary(*, quick: bool = False, out: str = "reports", adam_seconds: float | None = None) -> dict[str, Any]:
    """Measure everything, print the tables of ratios, write ``bench.json`` and ``bench.png``."""
    tf.get_logger().setLevel("ERROR")  # each run builds a new model: Keras's retracing notes are expected
    rounds = 7 if quick else 25
    adam_seconds = adam_seconds if adam_seconds is not None else (10.0 if quick else 60.0)
    report: dict[str, Any] = {"quick": quick, "keras": _keras.default_keras().__name__, "tensorflow": tf.__version__}
    lines: list[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    say(f"keras-opt-ref bench ({'quick' if quick else 'full'}): {report['keras']}, tensorflow {tf.__version__}, "
        f"medians [min-max] over rounds; ratios taken round by round")
    say("\n## Per evaluation, against the floor (one bare compiled TF value-and-gradient call)")
    say(f"{'workload':<22} {'weights':>7} {'floor ms':>20} {'loss+grad / floor':>20} {'HVP / loss+grad':>20}")
    evaluation = {}
    for name in ("linear", "mlp", "factorization"):
        w = workloads.make_workload(name, "medium")
        costs = evaluation_costs(w, rounds=rounds)
        evaluation[w.label] = costs
        size = sum(int(np.prod(v.shape)) for v in w.model.trainable_variables)
        say(f"{w.label:<22} {size:>7} {str(costs['floor s'].scaled(1e3)):>20} "
            f"{str(costs['loss+grad / floor']):>20} {str(costs['hvp / loss+grad']):>20}")
    w = workloads.make_workload("mlp", "small")
    costs = evaluation_costs(w, rounds=3, dense_hessian=True)
    evaluation["mlp-small dense Hessian"] = costs
    say(f"dense Hessian, mlp-small: {costs['hessian s']} s per Hessian = {costs['hessian / loss+grad']} loss+grad")
    report["evaluation"] = evaluation

    report["same_math"] = same = {}
    missing = {b: reason for b in SAME_MATH_BACKENDS if (reason := same_math.backend_skip_reason(b))}
    say("\n## Against the same math hand-written on a flat vector (keras_opt_ref.bench.same_math: one jitted "
        "function of one vector, float64 NumPy in and out; 'best': per round the faster of "
        f"{', '.join(b for b in SAME_MATH_BACKENDS if b not in missing)})")
    for b, reason in missing.items():
        say(f"{b}: left out, {reason}")
    say(f"{'workload':<22} {'loss+grad / best':>18} {'HVP / best HVP':>18} {'HVP / loss+grad':>18}   "
        "same-math ms per loss+grad, HVP; its HVP / loss+grad")
    for name in ("linear", "mlp", "factorization"):
        w = workloads.make_workload(name, "medium")
        costs = same_math_costs(w, rounds=rounds)
        same[w.label] = costs
        backends = "; ".join(
            f"{b} {costs[f'{b} loss+grad s'].median * 1e3:.3g}, {costs[f'{b} hvp s'].median * 1e3:.3g} "
            f"({costs[f'{b} same-math hvp / loss+grad'].median:.3g})"
            for b in SAME_MATH_BACKENDS if b not in missing)
        say(f"{w.label:<22} {str(costs['loss+grad / best same-math']):>18} "
            f"{str(costs['hvp / best same-math hvp']):>18} {str(costs['hvp / loss+grad']):>18}   {backends}")

    say("\n## Against what users would use instead (seconds per loss+gradient evaluation)")
    loop = per_batch_loop_costs(workloads.make_workload("factorization", "medium"), rounds=3 if quick else 5)
    say(f"factorization-medium: per-batch Python loop at batch 32 {loop['per-batch loop (batch 32) s']} s, "
        f"reference {loop['reference s'].scaled(1e3)} ms: loop / reference = {loop['loop / reference']}")
    report["per_batch_loop"] = loop
    report["hand_written"] = {}
    for name in ("linear", "factorization"):
        w = workloads.make_workload(name, "medium")
        hw = hand_written_costs(w, rounds=rounds)
        report["hand_written"][w.label] = hw
        say(f"{w.label}: hand-written NumPy/scipy.sparse {hw['hand-written s'].scaled(1e3)} ms, "
            f"reference {hw['reference s'].scaled(1e3)} ms: "
            f"reference / hand-written = {hw['reference / hand-written']}")

    say("\n## Runs (one fit epoch, full batch, maxiter 200; seconds include tracing and XLA compilation)")
    say(
        f"{'workload':<22} {'method':<13} {'seconds':>8} {'nit':>5} {'nfev':>6} {'njev':>6} {'nhev':>6} "
        f"{'final loss':>12}"
    )
    runs = []
    for name in ("linear", "mlp", "factorization"):
        for method in RUN_METHODS:
            if skip_reason(name, method):
                say(f"{name + '-medium':<22} {method:<13} skipped: {skip_reason(name, method)}")
                continue
            r = run_method(workloads.make_workload(name, "medium"), method, maxiter=200)
            runs.append(r)
            say(f"{r.workload:<22} {r.method:<13} {r.seconds:>8.2f} {r.nit:>5} {r.nfev:>6} {r.njev:>6} {r.nhev:>6} "
                f"{r.loss:>12.4e}")
    report["runs"] = [{k: v for k, v in r.__dict__.items() if k != "trace"} for r in runs]

    say(f"\n## Time to target on factorization-medium: Adam's best loss within {adam_seconds:g} s")
    configs = ((256, 1e-2),) if quick else ((64, 1e-2), (256, 1e-2), (1024, 1e-2))
    adam, config, adam_all = adam_reference("medium", seconds=adam_seconds, configs=configs)
    target = float(np.nanmin(adam[:, 1]))
    adam_time = time_to_target(adam, target)
    say(f"Adam (batch {config[0]}, lr {config[1]:g}; tried {list(adam_all)}): best full-batch loss {target:.4e} "
        f"after {adam_time:.1f} s of training")
    say(f"{'method':<13} {'seconds to target':>18} {'/ Adam':>8}")
    to_target = {}
    fact_runs = [r for r in runs if r.workload == "factorization-medium"]
    for r in fact_runs:
        t = time_to_target(r.trace, target)
        to_target[r.method] = t
        say(f"{r.method:<13} {t:>18.3f} {t / adam_time:>8.4f}")
    best = min((t for t in to_target.values() if math.isfinite(t)), default=math.nan)
    say(f"best full-batch method / Adam = {best / adam_time:.4f} (target: under 1/3)")
    report["time_to_target"] = {"target": target, "adam_seconds": adam_time, "adam_config": list(config),
                                "methods": to_target, "best_over_adam": best / adam_time}

    report["boundary"] = boundary_section(say, quick=quick)
    report["side_by_side"] = side_by_side_section(say, quick=quick)

    report["pinn"] = pinn_section(say, quick=quick)

    ls_size, ls_iter = "medium", (3 if quick else 10)
    say(f"\n## Least squares against minimize on mlp-{ls_size}: lm and trf get {ls_iter} evaluations, the minimize "
        f"methods {30 * ls_iter} iterations; target: the worse of lm's and trf's final losses")
    target_ls, rows_ls = least_squares_comparison(ls_size, maxiter=ls_iter)
    say(f"{'contender':<26} {'seconds':>8} {'nit':>5} {'nfev':>6} {'njev':>6} {'nhev':>6} {'final loss':>12} "
        f"{'s to target':>11}")
    for label, r, t in rows_ls:
        say(f"{label:<26} {r.seconds:>8.2f} {r.nit:>5} {r.nfev:>6} {r.njev:>6} {r.nhev:>6} {r.loss:>12.4e} {t:>11.2f}")
    say(f"common target loss {target_ls:.4e}")
    report["least_squares"] = {"target": target_ls, "rows": [
        {"contender": label, **{k: v for k, v in r.__dict__.items() if k != "trace"}, "seconds_to_target": t}
        for label, r, t in rows_ls]}

    say("\n## Scaling on the factorization (ratings x1, x4, x16 at 2% density; each size in a fresh process)")
    factors = (1, 4) if quick else (1, 4, 16)
    rows = scaling(factors) + scaling([factors[-1]], chunk_size=10**9)  # last: the same, unchunked
    base = rows[0]
    for row in rows:
        chunking = "unchunked" if row["chunk_size"] >= row["ratings"] else f"chunks of {row['chunk_size']}"
        say(f"x{row['factor']:<3} {row['ratings']:>8} ratings {row['weights']:>8} weights ({chunking}): "
            f"{row['seconds per evaluation'] * 1e3:8.2f} ms per evaluation "
            f"({row['seconds per evaluation'] / base['seconds per evaluation']:.2f}x), "
            f"peak RSS {row['peak RSS MiB']:.0f} MiB")
    report["scaling"] = rows

    say("\n## Targets (measured medians; the machine is shared, so read them with their min-max above)")
    mlp, fact = evaluation["mlp-medium"], evaluation["factorization-medium"]
    targets = [  # (what, measured, target, higher is better)
        ("loss+grad / floor, mlp-medium", mlp["loss+grad / floor"].median, 1.15, False),
        ("loss+grad / floor, factorization-medium", fact["loss+grad / floor"].median, 1.15, False),
        ("loss+grad / best same-math, mlp-medium", same["mlp-medium"]["loss+grad / best same-math"].median, 1.15,
         False),
        ("loss+grad / best same-math, factorization-medium",
         same["factorization-medium"]["loss+grad / best same-math"].median, 1.15, False),
        ("HVP / best same-math HVP, mlp-medium", same["mlp-medium"]["hvp / best same-math hvp"].median, 1.15, False),
        ("HVP / best same-math HVP, factorization-medium",
         same["factorization-medium"]["hvp / best same-math hvp"].median, 1.15, False),
        ("HVP / loss+grad, mlp-medium", mlp["hvp / loss+grad"].median, 2.0, False),
        ("HVP / loss+grad, factorization-medium", fact["hvp / loss+grad"].median, 2.0, False),
        ("per-batch loop (batch 32) / reference, factorization-medium", loop["loop / reference"].median, 30, True),
        *[(f"tfp in-graph L-BFGS / reference, seconds to target, {label}", max(c["rows"]["tfp"]["/ reference"]),
           2.0, True) for label, c in report["side_by_side"].items() if "s to target" in c["rows"].get("tfp", {})],
        ("best full-batch seconds to Adam's loss / Adam's seconds", best / adam_time, 1 / 3, False),
    ]
    for label, value, limit, higher in targets:
        met = value >= limit if higher else value <= limit
        say(f"{'met   ' if met else 'MISSED'} {label}: {value:.3g} (target {'>=' if higher else '<='} {limit:.3g})")
    report["targets"] = {label: {"measured": value, "target": limit} for label, value, limit, _ in targets}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=_jsonable)
    with open(os.path.join(out, "bench.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(fact_runs, adam, config, target, os.path.join(out, "bench.png"))
    print(f"\nwritten: {out}/bench.md, {out}/bench.json, {out}/bench.png")
    return report


def pinn_section(say: Callable[[str], None], *, quick: bool = False,
                 sizes: Sequence[str] | None = None) -> dict[str, Any]:
    """The PINN time-to-error race (:func:`keras_opt_ref.bench.pinn_timing.race`): poisson2d, each contender
    in its own process, one after another; small (quick) or small and medium."""
    from . import pinn_timing

    results = {}
    for size in sizes or (("small",) if quick else ("small", "medium")):
        target = 1e-2
        say(f"\n## PINN poisson2d-{size}: seconds to a relative L2 error of {target:g} against the exact solution "
            "(100 full-batch Adam steps, then L-BFGS; each contender in its own process; tracing and compilation "
            "counted, the error checks not)")
        race = pinn_timing.race("poisson2d", size, target=target, say=lambda line: None)
        say(f"{'contender':<30} {'s to error':>10} {'/ reference (TF)':>17} {'error':>9} {'steps':>6} {'s in all':>9}")
        for label, row in race["rows"].items():
            if "skipped" in row or "failed" in row:
                say(f"{label:<30} {row.get('skipped') or row.get('failed')}")
                continue
            seconds = "not reached" if row["seconds"] is None else f"{row['seconds']:.1f}"
            ratio = "" if row["/ reference"] is None else f"{row['/ reference']:.2f}"
            say(f"{label:<30} {seconds:>10} {ratio:>17} {row['error']:>9.2e} {row['steps']:>6} "
                f"{row['total seconds']:>9.1f}")
        results[race["workload"]] = race
    return results


def boundary_section(say: Callable[[str], None], *, quick: bool = False) -> list[dict[str, Any]]:
    """The per-evaluation boundary on each installed backend (:mod:`.boundary`), each in its own process."""
    say("\n## One evaluation taken apart, per backend (keras_opt_ref.bench.boundary; python -m "
        "keras_opt_ref.bench.boundary): ms per step, median over the rounds; boundary = evaluation - call; ratios "
        "median [min-max] against the same math hand-written on one flat vector, on the same backend")
    rows = boundary.compare("medium", rounds=5 if quick else 15)
    for line in boundary.table(rows):
        say(line)
    return rows


def side_by_side_section(say: Callable[[str], None], *, quick: bool = False,
                         workloads_sizes: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The fair side-by-side (:mod:`keras_opt_ref.bench.side_by_side`): the reference on each Keras backend
    against the other libraries' L-BFGS, each contender in its own process, in two orders."""
    from . import side_by_side

    say("\n## Time to target against other libraries' L-BFGS (keras_opt_ref.bench.side_by_side): every contender "
        "in a process of its own, same start, maxiter 200; target: the worst final loss below a tenth of the start; "
        "first s: the cold run (tracing and compilation); s to target: median of the warm runs (2 processes of 3 "
        "runs each; --quick: 1 of 1), in one order of the contenders | in the reverse order; orders agree: the two "
        "orders' noise bands overlap; fev/it: evaluations per iteration; ms/fev: the warm run's seconds per "
        "evaluation. Command: keras-opt-ref bench --side-by-side")
    results = {}
    default = [("mlp", "medium"), ("factorization", "medium")] + ([] if quick else [("mlp", "large"),
                                                                                     ("factorization", "large")])
    for name, size in workloads_sizes or default:
        result = side_by_side.side_by_side(name, size, maxiter=200, rounds=1 if quick else 3,
                                           processes=1 if quick else 2, say=say)
        for line in side_by_side.table(result):
            say(line)
        results[result["workload"]] = result
    return results


def section_only(section: str, *, quick: bool = False, out: str = "reports") -> dict[str, Any]:
    """``keras-opt-ref bench --pinn`` / ``--side-by-side`` / ``--boundary``: one section alone (:func:`pinn_section`,
    :func:`side_by_side_section` or :func:`boundary_section`), written to ``<section>.md`` and ``<section>.json``."""
    lines: list[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    sections = {"pinn": pinn_section, "side-by-side": side_by_side_section, "boundary": boundary_section}
    say(f"keras-opt-ref bench --{section} ({'quick' if quick else 'full'})")
    report = sections[section](say, quick=quick)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{section}.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=_jsonable)
    with open(os.path.join(out, f"{section}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"\nwritten: {out}/{section}.md, {out}/{section}.json")
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stat):
        return {"median": value.median, "min": value.lo, "max": value.hi}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value))


def _plot(runs: Sequence[Run], adam: np.ndarray, config: tuple[int, float], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        finite = np.isfinite(r.trace[:, 1])
        ax.plot(r.trace[finite, 0], r.trace[finite, 1], marker=".", markersize=3, label=f"{r.method} (full batch)")
    ax.plot(adam[:, 0], adam[:, 1], color="black", label=f"Adam, batch {config[0]}, lr {config[1]:g}")
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="Adam's best loss (target)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(left=0)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (training time; Adam's evaluation excluded)")
    ax.set_ylabel("full-batch training loss (MSE)")
    ax.set_title("Sparse factorization 2000 x 1000, 40,000 ratings")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
