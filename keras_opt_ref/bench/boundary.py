"""One evaluation as scipy calls it, taken apart: the per-evaluation boundary, per Keras backend.

scipy hands the objective a float64 NumPy ``x`` and wants the loss and a float64 gradient back. On each
backend (each in a process of its own: ``KERAS_BACKEND`` is read at import) and workload this times, round
by round (best of ``repeat`` calls, :func:`.timing.round_robin`):

- ``in``: ``x`` to the backend's input, rounded to the compute dtype where it computes;
- ``call``: the compiled value-and-gradient with its input ready, until its result is computed
  (TensorFlow's concrete function under XLA, ``jax.jit`` to ``block_until_ready``, torch's eager autograd);
- ``out``: the result to float64 NumPy;
- ``evaluation``: ``Objective.value_and_grad(x)``, all that scipy waits for, at distinct points;
- ``empty call`` (TensorFlow, JAX): a compiled function of the same input and output that computes nothing,
  the dispatch alone;
- ``same-math <form> call`` and ``... evaluation``: the workload's math written by hand on one flat vector
  (:mod:`.same_math`) on the same backend, its three steps and the whole, in each form: ``keras``, as
  Keras's layers compute it, and ``elementwise``, the fastest form we know (they differ for the
  factorization, whose ``keras.layers.Dot`` is a batched matrix product).

Derived per round: ``boundary`` = evaluation - call (everything that is not the compiled computation: in,
out, the memo, copies and checks), and the ratios ``evaluation / same-math <form> evaluation`` and
``call / same-math <form> call``. The values are checked to agree before anything is timed::

    python -m keras_opt_ref.bench.boundary                       # each installed backend; mlp, factorization
    python -m keras_opt_ref.bench.boundary --one mlp medium      # this process's backend, one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import child
from .child import BACKENDS, installed

WORKLOADS = ("mlp", "factorization")

__all__ = ["compare", "empty_call", "measure", "table"]


def empty_call(backend: str, size: int, dtype: np.dtype) -> Callable[[Any], Any] | None:
    """A compiled function from the input vector to an output of the evaluation's shape that computes
    nothing: what a call costs the backend before any math (``None`` for eager torch)."""
    if backend == "tensorflow":
        import tensorflow as tf

        def nothing(v):
            v = tf.cast(v, tf.float64)
            return tf.concat([v[:1], v], 0)

        return tf.function(nothing, jit_compile=True).get_concrete_function(tf.TensorSpec([size], dtype))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        fn = jax.jit(lambda v: jnp.concatenate([v[:1], v]))
        return lambda v: fn(v).block_until_ready()
    return None


def measure(workload_name: str, size: str = "medium", *, rounds: int = 15, repeat: int = 10) -> dict[str, Any]:
    """This process's backend on one workload: milliseconds per step (median and min-max over the rounds)
    and the ratios of the module docstring, as ``{name: [median, min, max]}``."""
    import keras

    from .. import backends
    from . import same_math
    from .timing import Stat, cycling_points, round_robin
    from .workloads import make_workload

    workload = make_workload(workload_name, size, keras=keras)
    objective = backends.make_objective(workload.model, workload.x, workload.y)
    backend = objective.backend
    x0 = objective.flat.read()
    # Each timed function its own cycle of points: the point after its last call is never the one a memo holds.
    point, in_point, *math_points = (cycling_points(x0, 7, seed) for seed in range(2 + len(same_math.FORMS)))
    w0 = objective._device_vector(x0)
    out0 = objective._value_and_grad_call(w0)
    fns: dict[str, Callable[[], Any]] = {
        "evaluation": lambda: objective.value_and_grad(point()),
        "in": lambda: objective._device_vector(in_point()),
        "call": lambda: objective._value_and_grad_call(w0),
        "out": lambda: objective._to_host(out0),
    }
    empty = empty_call(backend, objective.size, objective.flat.common_dtype)
    if empty is not None:
        fns["empty call"] = lambda: empty(w0)
    forms = same_math.FORMS if workload_name == "factorization" else ("keras",)
    f_ref, g_ref = objective.value_and_grad(x0)
    scale = np.abs(g_ref).max()
    for form, math_point in zip(forms, math_points, strict=False):
        math_ = same_math.same_math(workload, backend, form=form)
        f, g = math_.value_and_grad(x0)
        if not (abs(f - f_ref) <= 1e-5 * abs(f_ref) and np.allclose(g, g_ref, rtol=1e-3, atol=1e-6 * scale)):
            raise RuntimeError(f"same math ({form}) and the reference disagree at the start: {f} vs {f_ref}")
        v0 = math_.device_vector(x0)
        fns[f"same-math {form} call"] = lambda m=math_, v=v0: m.call(v)
        fns[f"same-math {form} evaluation"] = lambda m=math_, p=math_point: m.value_and_grad(p())
    t = round_robin(fns, rounds=rounds, repeat=repeat)
    stats = {f"{name} ms": Stat.of(1e3 * v) for name, v in t.items()}
    stats["boundary ms"] = Stat.of(1e3 * (t["evaluation"] - t["call"]))
    for form in forms:
        same = f"same-math {form}"
        stats[f"evaluation / {same} evaluation"] = Stat.of(t["evaluation"] / t[f"{same} evaluation"])
        stats[f"call / {same} call"] = Stat.of(t["call"] / t[f"{same} call"])
    out: dict[str, Any] = {name: [s.median, s.lo, s.hi] for name, s in stats.items()}
    out.update(backend=backend, workload=f"{workload_name}-{size}", weights=objective.size,
               samples=objective.num_samples)
    return out


def compare(size: str = "medium", *, rounds: int = 15, backends: Sequence[str] = BACKENDS,
            workloads: Sequence[str] = WORKLOADS, timeout: float = 900.0) -> list[dict[str, Any]]:
    """:func:`measure` for every installed backend and workload, each in a fresh process."""
    rows = []
    for backend in [b for b in backends if installed(b)]:
        for name in workloads:
            row = child.json_row("keras_opt_ref.bench.boundary", ["--one", name, size, "--rounds", str(rounds)],
                                 env=child.backend_env(backend), timeout=timeout)
            rows.append({"backend": backend, "workload": f"{name}-{size}", **row})
    return rows


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per backend and workload: the steps in ms (medians) and the ratios (median [min-max])."""
    def ms(row: dict[str, Any], key: str) -> str:
        return f"{row[key][0]:.3f}" if key in row else "-"

    def ratio(row: dict[str, Any], key: str) -> str:
        return f"{row[key][0]:.2f} [{row[key][1]:.2f}-{row[key][2]:.2f}]" if key in row else "-"

    steps = ("in", "call", "out", "empty call", "boundary", "evaluation", "same-math keras evaluation")
    lines = ["| backend | workload | " + " | ".join(f"{s} ms" for s in steps)
             + " | evaluation / same-math (Keras's form) | call / same-math (Keras's form) | evaluation / same-math"
             " (elementwise) |", "|" + "---|" * (len(steps) + 5)]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['backend']} | {row['workload']} | failed: {row['failed']} |")
            continue
        lines.append(f"| {row['backend']} | {row['workload']} | "
                     + " | ".join(ms(row, f"{s} ms") for s in steps) + " | "
                     + " | ".join(ratio(row, k) for k in ("evaluation / same-math keras evaluation",
                                                          "call / same-math keras call",
                                                          "evaluation / same-math elementwise evaluation")) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "SIZE"),
                        help="measure one workload on this process's backend and print one JSON line")
    parser.add_argument("--size", default="medium")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, rounds=args.rounds)))
        return 0
    print("\n".join(table(compare(args.size, rounds=args.rounds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
