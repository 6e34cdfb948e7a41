"""Time to a common target loss, every contender in a process of its own: the fair side-by-side.

The earlier comparison (``measure.alternatives_time_to_target``, removed) ran every contender in one long
process, round by round; there the reference's fits took 2-4x their time measured alone, while the
contenders' stayed stable. Part of that was its clock: it placed the reference's trace by all the time
``fit`` spent outside scipy, including Keras's teardown after the run (up to 0.6 s after a long run);
the trace now counts from ``result.started``. Here, besides, no contender shares a process with another:

1. **Target.** Each contender runs in a fresh process (``python -m keras_opt_ref.bench.side_by_side``):
   once cold (tracing and compilation included), then once warm to its own stop, from the workload's
   initial weights, with the same iteration limit. Its final loss is judged there by the reference's
   objective on that process's Keras backend. The target is the worst final loss below a tenth of the start
   (times ``1 + 1e-5``), so that every contender that did not stall reaches it.
2. **Rounds.** Each contender runs again in fresh processes: in each, one cold run, then ``rounds`` warm runs
   to the target, back to back. The contenders' processes follow one another in the order given, ``processes``
   times over, then in the reverse order (``orders=2``): a figure that moves with the order is noise of the
   machine, not a speed, and the two orders' medians are reported side by side, with a verdict: the order
   changes no ratio beyond the noise when the orders' noise bands overlap (:func:`order_verdict`). The band
   needs more than one process per order: one process's rounds agree within a few percent, while two
   processes of the same contender differed by up to 50% (factorization-medium, torch's ``LBFGS``: 0.40 s and
   0.27 s), so a band from one process's rounds would call the machine's spread between processes an order.

The contenders: ``reference (<backend>)``, scipy L-BFGS-B through ``fit`` on each installed Keras backend,
and the installed libraries of :mod:`.alternatives` (tfp, jaxopt, optimistix, torch) on the same math. Each
row reports the iterations and evaluations of its warm run to its own stop and their ratio, the evaluations
per iteration: where a library is ahead, that and the seconds per evaluation say why.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import child

__all__ = ["CONTENDERS", "contender_in_this_process", "side_by_side", "time_to_target"]

REFERENCE_BACKENDS = ("tensorflow", "jax", "torch")
LIBRARIES = ("tfp", "jaxopt", "optimistix", "torch")
CONTENDERS = tuple(f"reference ({b})" for b in REFERENCE_BACKENDS) + LIBRARIES


def _backend_of(contender: str) -> str:
    return contender[len("reference ("):-1] if contender.startswith("reference (") else "tensorflow"


def contender_in_this_process(contender: str, name: str, size: str, *, maxiter: int = 200,
                              target: float | None = None, rounds: int = 3) -> dict[str, Any]:
    """Run ``contender`` here (its backend must be this process's): a cold run, a warm run to its own
    stop, then, if ``target`` is given, ``rounds`` warm runs to the target. Returns the counts of the warm
    run, its final loss as the reference's objective judges it, the start loss, and the seconds."""
    from .. import backends
    from . import workloads

    judge_work = workloads.make_workload(name, size)
    judge = backends.make_objective(judge_work.model, judge_work.x, judge_work.y)
    start_loss = judge.value(judge.flat.read())
    if contender.startswith("reference ("):
        runner: Any = _Reference(workloads.make_workload(name, size), maxiter)
    else:
        from . import alternatives

        runner = _Library(alternatives.make_contender(contender, workloads.make_workload(name, size), maxiter))
    first, _, _ = runner.run()
    full, counts, x = runner.run()
    row = {"contender": contender, "workload": f"{name}-{size}", "maxiter": maxiter, "start loss": start_loss,
           "first run s": first, "full run s": full, **counts, "final loss": judge.value(x), "pid": os.getpid()}
    row["evaluations per iteration"] = counts["nfev"] / max(counts["nit"], 1)
    row["s per evaluation"] = full / max(counts["nfev"], 1)
    if target is not None:
        row["target"] = target
        row["s to target"] = [runner.to_target(target) for _ in range(rounds)]
    return row


def time_to_target(trace: np.ndarray, target: float) -> float:
    """First time in a ``(seconds, loss)`` trace at which the loss is at or below ``target``."""
    hit = np.nonzero(trace[:, 1] <= target)[0]
    return float(trace[hit[0], 0]) if hit.size else math.nan


class _Reference:
    """The reference's L-BFGS-B through ``fit``, again and again from the initial weights. The seconds to
    the target are read from the run's trace, shifted so that they count from the ``fit`` call (the trace
    counts from ``result.started``)."""

    def __init__(self, work: Any, maxiter: int) -> None:
        from .. import scipy_optimizer

        self.work, self.start = work, work.model.get_weights()
        work.model.train_function = scipy_optimizer.make_train_function(work.model, method="L-BFGS-B",
                                                                         maxiter=maxiter)

    def run(self) -> tuple[float, dict[str, int], np.ndarray]:
        w = self.work
        w.model.set_weights(self.start)
        began = time.perf_counter()
        w.model.fit(w.x, w.y, batch_size=w.num_samples, epochs=1, verbose=0)
        seconds = time.perf_counter() - began
        result = w.model.train_function.result
        self.trace = np.array(result.trace, dtype=float)
        # From the fit call: the time before the scipy run (data, checks), not what fit spends after it
        # (Keras's teardown of its tf.data iterator took up to 0.6 s after a 0.7 s run, measured 2026-12-06).
        self.trace[:, 0] += result.started - began
        return seconds, {"nit": int(result.nit), "nfev": int(result.nfev)}, np.asarray(result.x)

    def to_target(self, target: float) -> float:
        self.run()
        return time_to_target(self.trace, target)


class _Library:
    """A contender of :mod:`.alternatives`: its ``run(target)`` stops at the target by its own test."""

    def __init__(self, contender: Any) -> None:
        self.contender = contender

    def run(self) -> tuple[float, dict[str, int], np.ndarray]:
        r = self.contender.run()
        return r.seconds, {"nit": int(r.nit), "nfev": int(r.nfev)}, np.asarray(r.x, dtype=np.float64)

    def to_target(self, target: float) -> float:
        r = self.contender.run(target)
        return r.seconds if r.loss <= target else math.nan


# ------------------------------------------------------------------ the parent: one process per contender
def skip_reason(contender: str) -> str:
    """Why ``contender`` cannot run here (a package missing), or ``""``."""
    if not contender.startswith("reference ("):
        from . import alternatives

        return alternatives.skip_reason(contender) or ""
    backend = _backend_of(contender)
    return "" if child.installed(backend) else f"{backend} is not installed"


def in_a_process(contender: str, name: str, size: str, *, maxiter: int, target: float | None = None,
                 rounds: int = 3, timeout: float = 1800.0) -> dict[str, Any]:
    """:func:`contender_in_this_process` in a fresh process on the contender's Keras backend."""
    args = [contender, name, size, "--maxiter", str(maxiter), "--rounds", str(rounds)]
    args += [] if target is None else ["--target", repr(target)]
    return child.json_row("keras_opt_ref.bench.side_by_side", args, env=child.backend_env(_backend_of(contender)),
                          timeout=timeout)


def side_by_side(name: str, size: str = "medium", *, maxiter: int = 200, rounds: int = 3, orders: int = 2,
                 processes: int = 2, contenders: Sequence[str] = CONTENDERS,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    """The fair table for one workload (see the module docstring). Returns ``{"workload", "start", "target",
    "skipped", "rows"}``; each row: the warm run's counts and seconds, ``s to target`` per order (lists of the
    ``processes x rounds`` warm runs), ``median s to target`` and ``/ reference`` (its median over the TensorFlow
    reference's, per order), with :func:`order_verdict`'s bands and verdict."""
    skipped = {c: why for c in contenders if (why := skip_reason(c))}
    running = [c for c in contenders if c not in skipped]
    rows: dict[str, dict[str, Any]] = {}
    for c in running:
        rows[c] = in_a_process(c, name, size, maxiter=maxiter)
        if "failed" in rows[c]:
            say(f"{c}: failed, {rows[c]['failed']}")
    finished = {c: row for c, row in rows.items() if "failed" not in row}
    if not finished:
        raise RuntimeError(f"no contender ran on {name}-{size}: {rows}")
    start = next(iter(finished.values()))["start loss"]
    finals = [row["final loss"] for row in finished.values()]
    target = max([f for f in finals if f <= start / 10] or finals) * (1 + 1e-5)
    for order in range(orders):
        sequence = list(finished) if order % 2 == 0 else list(reversed(finished))
        for c in finished:
            finished[c].setdefault("s to target", []).append([])
        for c in sequence * processes:
            timed = in_a_process(c, name, size, maxiter=maxiter, target=target, rounds=rounds)
            finished[c]["s to target"][-1] += timed.get("s to target", [math.nan] * rounds)
    for row in finished.values():
        row["median s to target"] = [float(np.median(t)) for t in row["s to target"]]
    reference = finished.get("reference (tensorflow)", {}).get("s to target", [[math.nan]] * orders)
    for row in finished.values():
        row.update(order_verdict(row["s to target"], reference))
    return {"workload": f"{name}-{size}", "start": start, "target": target, "maxiter": maxiter, "rounds": rounds,
            "orders": orders, "processes": processes, "skipped": skipped, "rows": rows}


def order_verdict(times: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per order of the contenders: the ratio of a contender's median seconds to the reference's, and its noise
    band, from the extremes of the order's warm runs, all its processes' (its fastest over the reference's
    slowest run, its slowest over the reference's fastest). The order changes no ratio beyond the noise when
    every two orders' bands overlap."""
    ratio = [float(np.median(t) / np.median(r)) for t, r in zip(times, reference, strict=True)]
    band = [[float(np.min(t) / np.max(r)), float(np.max(t) / np.min(r))] for t, r in zip(times, reference, strict=True)]
    finite = all(math.isfinite(b) for pair in band for b in pair)
    agree = finite and max(lo for lo, _ in band) <= min(hi for _, hi in band)
    return {"/ reference": ratio, "/ reference band": band, "orders agree": bool(agree) if finite else None}


def table(result: dict[str, Any]) -> list[str]:
    """The side-by-side as text lines: one row per contender."""
    lines = [f"{result['workload']}: start loss {result['start']:.4e}, target {result['target']:.4e}, maxiter "
             f"{result['maxiter']}; s to target: median of {result.get('processes', 1)} processes x "
             f"{result['rounds']} warm runs, in order 1 | reverse order"
             + "".join(f"; {c} left out: {why}" for c, why in result["skipped"].items()),
             f"{'contender':<22} {'first s':>8} {'full s':>7} {'nit':>5} {'nfev':>5} {'fev/it':>6} "
             f"{'ms/fev':>7} {'final loss':>10} {'s to target':>15} {'/ reference':>13} {'orders agree':>12}"]
    for c, row in result["rows"].items():
        if "failed" in row:
            lines.append(f"{c:<22} failed: {row['failed']}")
            continue
        seconds = " | ".join(f"{m:.3g}" for m in row["median s to target"])
        ratio = " | ".join(f"{r:.2f}" for r in row["/ reference"])
        agree = {True: "yes", False: "NO", None: "-"}[row.get("orders agree")]
        lines.append(f"{c:<22} {row['first run s']:>8.2f} {row['full run s']:>7.3f} {row['nit']:>5} {row['nfev']:>5} "
                     f"{row['evaluations per iteration']:>6.2f} {row['s per evaluation'] * 1e3:>7.2f} "
                     f"{row['final loss']:>10.4e} {seconds:>15} {ratio:>13} {agree:>12}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="one contender of the side-by-side in this process (JSON row)")
    parser.add_argument("contender", choices=CONTENDERS)
    parser.add_argument("name")
    parser.add_argument("size")
    parser.add_argument("--maxiter", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target", type=float, default=None)
    args = parser.parse_args(argv)
    row = contender_in_this_process(args.contender, args.name, args.size, maxiter=args.maxiter, target=args.target,
                                    rounds=args.rounds)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
