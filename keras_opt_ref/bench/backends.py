"""Which Keras backend for a full-batch fit on this CPU: the reference on TensorFlow, JAX and torch.

Per backend and workload: the floor (one bare compiled value-and-gradient call of that backend on
the whole data set: ``tf.function`` + XLA, ``jax.jit(jax.value_and_grad)``, torch autograd), the
reference's loss+grad and HVP through :func:`keras_opt_ref.backends.make_objective` (float64 NumPy in
and out), their ratios, and the wall time of an L-BFGS-B ``fit`` (maxiter 200, compile included)
with its final loss. Each backend runs in its own process (``KERAS_BACKEND`` is read at import)::

    python -m keras_opt_ref.bench.backends                    # all installed backends, mlp + factorization
    python -m keras_opt_ref.bench.backends --size small --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from . import child

BACKENDS = child.BACKENDS
WORKLOADS = ("mlp", "factorization")


def floor_function(objective: Any) -> Any:
    """One bare compiled value-and-gradient call of the objective's backend, on all data at once."""
    import keras

    model, (x, y, sample_weight) = objective.model, objective.data
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from .measure import floor_function as tf_floor

        return tf_floor(objective)
    if backend == "jax":
        import jax

        state = ([v.value for v in model.non_trainable_variables], [v.value for v in model.metrics_variables])

        def loss(trainable, x, y, sample_weight):
            return model.compute_loss_and_updates(trainable, *state, x, y, sample_weight, training=False)[0]

        # The data as arguments, as plain JAX code takes it (and as the TF floor reads it): closed over,
        # jit would bake it into the executable as constants, recompiled for every new data set.
        value_and_grad = jax.jit(jax.value_and_grad(loss))
        trainable = [v.value for v in model.trainable_variables]
        args = jax.tree.map(jax.numpy.asarray, (x, y, sample_weight))

        def call():
            f, g = value_and_grad(trainable, *args)
            return float(f), np.concatenate([np.asarray(t, np.float64).ravel() for t in g])

        return call
    import torch

    to = lambda t: None if t is None else keras.ops.convert_to_tensor(t)  # noqa: E731
    x, y, sample_weight = (keras.tree.map_structure(to, part) if part is not None else None
                           for part in (x, y, sample_weight))
    params = [v.value for v in model.trainable_variables]

    def call():
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=False), sample_weight=sample_weight,
                                  training=False)
        grads = torch.autograd.grad(loss, params)
        return float(loss), torch.cat([g.reshape(-1) for g in grads]).double().numpy()

    return call


def measure(workload_name: str, size: str, rounds: int = 9, repeat: int = 3, maxiter: int = 200) -> dict[str, Any]:
    """This process's backend on one workload: seconds per call, ratios, L-BFGS-B fit time."""
    import keras

    from .. import backends as core
    from .. import scipy_optimizer
    from .timing import Stat, cycling_points, round_robin
    from .workloads import make_workload

    workload = make_workload(workload_name, size, keras=keras)
    objective = core.make_objective(workload.model, workload.x, workload.y)
    floor = floor_function(objective)
    x0 = objective.flat.read()
    p = np.random.default_rng(1).normal(size=x0.size)
    point = cycling_points(x0, 7)
    f_floor, g_floor = floor()
    f_ref, g_ref = objective.value_and_grad(x0)
    agree = abs(f_floor - f_ref) <= 1e-5 * abs(f_ref) and np.allclose(g_floor, g_ref, rtol=1e-3, atol=1e-6)
    if not agree:
        raise RuntimeError(f"floor and reference disagree at the start: {f_floor} vs {f_ref}")
    fns = {"floor": floor, "loss+grad": lambda: objective.value_and_grad(point()),
           "hvp": lambda: objective.hessp(point(), p)}
    t = round_robin(fns, rounds=rounds, repeat=repeat)
    out: dict[str, Any] = {f"{name} ms": Stat.of(1e3 * v).median for name, v in t.items()}
    out["loss+grad / floor"] = Stat.of(t["loss+grad"] / t["floor"]).median
    out["hvp / loss+grad"] = Stat.of(t["hvp"] / t["loss+grad"]).median

    fresh = make_workload(workload_name, size, keras=keras)
    fresh.model.train_function = scipy_optimizer.make_train_function(fresh.model, method="L-BFGS-B", maxiter=maxiter)
    start = time.perf_counter()
    fresh.model.fit(fresh.x, fresh.y, batch_size=len(fresh.y), verbose=0)
    out["L-BFGS-B fit s"] = time.perf_counter() - start
    out["final loss"] = float(fresh.model.train_function.result.fun)
    out["nfev"] = int(fresh.model.train_function.result.nfev)
    return out


installed = child.installed


def compare(size: str = "medium", rounds: int = 9, backends: tuple[str, ...] = BACKENDS,
            workloads: tuple[str, ...] = WORKLOADS, maxiter: int = 200) -> dict[str, dict[str, Any]]:
    """Every installed backend on every workload, each backend in a fresh process."""
    results: dict[str, dict[str, Any]] = {}
    for backend in backends:
        if not installed(backend):
            continue
        for name in workloads:
            args = ["--one", name, "--size", size, "--rounds", str(rounds), "--maxiter", str(maxiter)]
            row = child.json_row("keras_opt_ref.bench.backends", args, env={"KERAS_BACKEND": backend}, timeout=3600)
            if "failed" in row:
                raise RuntimeError(f"{backend} {name} failed: {row['failed']}")
            results[f"{backend} {name}"] = row
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    keys = ["floor ms", "loss+grad ms", "hvp ms", "loss+grad / floor", "hvp / loss+grad", "L-BFGS-B fit s",
            "final loss", "nfev"]
    lines = ["| backend workload | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for who, row in results.items():
        lines.append(f"| {who} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="measure one workload in this process's backend and print JSON")
    parser.add_argument("--size", default="medium")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--maxiter", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.size, rounds=args.rounds, maxiter=args.maxiter)))
        return 0
    results = compare(args.size, args.rounds, maxiter=args.maxiter)
    print(table(results))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
