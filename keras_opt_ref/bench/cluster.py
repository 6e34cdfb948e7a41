"""Multi-worker full-batch runs on localhost: N worker processes under ``MultiWorkerMirroredStrategy``.

Each worker is ``python -m keras_opt_ref.bench.cluster --job JOB --out FILE`` with its own ``TF_CONFIG``
(the cluster's ``localhost:port`` list and its index), as on real machines::

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'

Every worker builds the model under the strategy's scope and calls ``fit`` on the same arrays; the
strategy's input pipeline hands each worker its own shard of the batches, and the objective
all-reduces values, gradients and HVPs, so every worker runs the same scipy loop on the same numbers.
:func:`launch` starts the workers (no ``TF_CONFIG`` and one worker: a plain single-device run, the
comparison) and returns what each wrote. Used by tests/test_distributed.py and the benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

JOBS = ("regression", "factorization", "evaluations")


def launch(job: str, workers: int, *, timeout: float = 600.0, allow_failures: bool = False,
           **params: Any) -> list[dict[str, Any]]:
    """Run ``job`` on ``workers`` localhost processes (1: no strategy) and return each one's result.

    A worker that exits with an error ends the run with an error naming it and the tail of its output
    (``allow_failures``: its result is ``{"exit_code": ..., "log": ...}`` instead). A run that does not
    finish within ``timeout`` seconds is stopped."""
    ports = _free_ports(workers) if workers > 1 else []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for index in range(workers):
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
            env.pop("TF_CONFIG", None)
            if ports:
                cluster = {"worker": [f"localhost:{p}" for p in ports]}
                env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            out, log = Path(tmp) / f"worker{index}.json", Path(tmp) / f"worker{index}.log"
            cmd = [sys.executable, "-m", "keras_opt_ref.bench.cluster", "--job", job, "--out", str(out),
                   "--params", json.dumps(params)]
            procs.append((subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), out, log))
        deadline = time.monotonic() + timeout
        failed: dict[int, dict[str, Any]] = {}
        try:
            for index, (proc, _, log) in enumerate(procs):
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0 and not allow_failures:
                    raise RuntimeError(f"worker {index} of {workers} exited with {code}:\n{_tail(log)}")
                if code != 0:
                    failed[index] = {"exit_code": code, "log": _tail(log)}
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"the {workers}-worker {job!r} run did not finish in {timeout:.0f} s") from exc
        finally:
            for proc, _, _ in procs:
                if proc.poll() is None:
                    proc.kill()
        return [failed.get(i) or {**json.loads(out.read_text()), "log": _tail(log)}
                for i, (_, out, log) in enumerate(procs)]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tail(log: Path, lines: int = 200) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------ inside a worker
def _worker(job: str, params: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    from .. import backends as core
    from .. import scipy_optimizer
    from ..base import keras_compat as _keras
    from . import workloads

    keras = _keras.default_keras()
    # The same starting weights in every run and on every worker: a run's result does not depend on the
    # process (unseeded, trust-ncg's gtol stop landed 4e-4 from the regression's optimum in some runs).
    keras.utils.set_random_seed(params.get("seed", 0))
    if hasattr(keras, "config") and hasattr(keras.config, "disable_traceback_filtering"):
        keras.config.disable_traceback_filtering()  # a worker's error is read from its log: keep all of it
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ else None
    replicas = params.get("replicas", 1)
    if strategy is None and replicas > 1:  # one process, several logical CPU devices: MirroredStrategy
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    dtype = params.get("dtype", "float64")
    keras.backend.set_floatx(dtype)  # the loss computes in floatx: float64 end to end
    if job == "regression":  # the README example
        X, y = workloads.readme_regression()
        with scope:
            model = workloads.linear_model(keras, 4, dtype=dtype)
            model.compile(loss="mse")
        method = params.get("method", "trust-ncg")
        model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=params.get("maxiter"),
                                                                   verbose=params.get("verbose", 0),
                                                                   callbacks=_callbacks(keras, strategy, params))
        _maybe_fail(model, strategy, params)
        return _train(model, X, y, strategy, params) or _summary(model, strategy)
    data = workloads.factorization_data(*params.get("shape", (200, 100, 4000)), seed=params.get("seed", 0))
    with scope:
        model = workloads.factorization_model(keras, data.n_users, data.n_items, width=params.get("width", 8),
                                              dtype=dtype)
        model.compile(loss="mse")
    if job == "factorization":
        model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B",
                                                                   maxiter=params.get("maxiter", 50))
        _maybe_fail(model, strategy, params)
        return _train(model, data.x, data.ratings, strategy, params) or _summary(model, strategy)
    # "evaluations": the cost of one value-and-gradient on this worker's shard, and of the all-reduce alone
    resolver = strategy.cluster_resolver if strategy is not None else None
    index, count = (resolver.task_id, strategy.num_replicas_in_sync) if resolver is not None else (0, 1)
    rows = slice(index, None, count)  # this worker's shard of the ratings (all of them in one process)
    x_local = [t[rows] for t in data.x]
    objective = core.make_objective(model, x_local, data.ratings[rows], chunk_size=params.get("chunk_size", 8192))
    x0 = objective.flat.read()
    rounds = params.get("rounds", 30)
    times = []
    for i in range(rounds + 3):
        start = time.perf_counter()
        objective.value_and_grad(x0 + i * 1e-9)  # a new x each time: no memo
        times.append(time.perf_counter() - start)
    result = {"evaluation_ms": 1e3 * float(np.median(times[3:])), "size": objective.size,
              "rows": int(objective.num_samples), "workers": count, "replicas": replicas if count == 1 else count,
              "objective": type(objective).__name__}
    if strategy is not None:
        reduce = tf.function(lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, (v,)),
                                                       axis=None))
        v = tf.constant(x0.astype(np.float64))
        times = []
        for _ in range(rounds + 3):
            start = time.perf_counter()
            reduce(v).numpy()
            times.append(time.perf_counter() - start)
        result["all_reduce_ms"] = 1e3 * float(np.median(times[3:]))
    return result


def _train(model: Any, x: Any, y: Any, strategy: Any, params: dict[str, Any]) -> dict[str, Any] | None:
    """``fit`` on the whole arrays, unshuffled (the strategy's pipeline shards the batches), or
    (``"run"``) the train function's own ``run`` on this worker's rows ``index::workers``. If the run
    raises: what it raised and where it left the model."""
    start = [w.copy() for w in model.get_weights()]
    try:
        _fit_or_run(model, x, y, strategy, params)
    except Exception as exc:  # noqa: BLE001 -- reported to the launcher
        import numpy as np

        train = model.train_function
        objective = train.objective
        return {"error": type(exc).__name__, "message": str(exc)[:2000],
                "chief": strategy is None or strategy.cluster_resolver.task_id == 0,
                "best_value": float(objective.best_value),
                "left_at_best": bool(np.array_equal(objective.flat.read(), objective.best_x)),
                "message_of_result": train.result.message if train.result is not None else None,
                # the start is the first point evaluated: the best point differs only if it is lower
                "moved_from_start": not all(np.array_equal(a, b)
                                            for a, b in zip(start, model.get_weights(), strict=True))}
    return None


def _fit_or_run(model: Any, x: Any, y: Any, strategy: Any, params: dict[str, Any]) -> None:
    if params.get("mode", "fit") == "fit":
        # shuffle=False: each worker would shuffle with its own seed before the pipeline shards the
        # batches, and the workers' shards would not add up to the training set
        model.fit(x, y, batch_size=params.get("batch_size", 4), epochs=1, verbose=0, shuffle=False)
        return
    index, count = (strategy.cluster_resolver.task_id, strategy.num_replicas_in_sync) if strategy else (0, 1)
    shard = lambda t: t[index::count]  # noqa: E731
    model.train_function.run([shard(t) for t in x] if isinstance(x, list) else shard(x), shard(y))


def _callbacks(keras: Any, strategy: Any, params: dict[str, Any]) -> list[Any]:
    """With ``callbacks_dir=D`` (tests): the callbacks every worker is given, as one script gives them on
    every machine: a CSVLogger and a ModelCheckpoint writing ``D/worker<index>...``, and a stop at the
    end of iteration ``stop_at`` (a decision every worker must take alike)."""
    directory = params.get("callbacks_dir")
    if directory is None:
        return []
    index = strategy.cluster_resolver.task_id if strategy is not None and strategy.cluster_resolver else 0
    stop_at = params.get("stop_at", 2)

    class StopAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch + 1 >= stop_at:
                self.model.stop_training = True

    return [keras.callbacks.CSVLogger(os.path.join(directory, f"worker{index}.csv")),
            keras.callbacks.ModelCheckpoint(os.path.join(directory, f"worker{index}.weights.h5"),
                                            save_weights_only=True),
            StopAt()]


def _maybe_fail(model: Any, strategy: Any, params: dict[str, Any]) -> None:
    """With ``fail_after=N`` (tests), worker 1 exits after N evaluations of value and gradient: its train
    function builds a subclass of the model's objective that does."""
    evaluations = params.get("fail_after")
    if evaluations is None or strategy is None or strategy.cluster_resolver.task_id != 1:
        return
    from .. import backends

    class Dying(backends.objective_class(model)):
        calls = 0

        def _compute_value_and_grad(self, x: Any) -> Any:
            Dying.calls += 1
            if Dying.calls > evaluations:
                os._exit(3)
            return super()._compute_value_and_grad(x)

    model.train_function.objective_class = Dying


def _summary(model: Any, strategy: Any) -> dict[str, Any]:
    import numpy as np

    train = model.train_function
    result, objective = train.result, train.objective
    f, g = objective.value_and_grad(np.full(objective.size, 0.5))  # every worker calls it: SPMD
    return {
        "probe": [float(f), *map(float, g)],
        "rows": int(getattr(objective, "total_samples", objective.num_samples)),
        "weights": [w.tolist() for w in model.get_weights()],
        "x": [float(v) for v in result.x], "fun": float(result.fun), "nit": int(result.nit),
        "nfev": int(result.nfev), "objective": type(train.objective).__name__,
        "workers": strategy.num_replicas_in_sync if strategy is not None else 1,
        "chief": strategy is None or strategy.cluster_resolver.task_id == 0,
    }


# ------------------------------------------------------------------ the scaling benchmark
def scaling(size: str = "large", rounds: int = 30) -> list[dict[str, Any]]:
    """Seconds per value-and-gradient on the factorization at ``size``: 1 and 2 replicas (one process,
    MirroredStrategy), 1 and 2 localhost workers (MultiWorkerMirroredStrategy), with the all-reduce
    of one gradient alone; float32, as users train it."""
    from .workloads import FACTORIZATION_SIZES

    params = {"shape": list(FACTORIZATION_SIZES[size]), "width": 16, "dtype": "float32", "rounds": rounds}
    rows = []
    for label, workers, replicas in (("1 device", 1, 1), ("2 replicas", 1, 2), ("2 workers", 2, 1)):
        result = launch("evaluations", workers, timeout=1800, replicas=replicas, **params)[0]
        result.pop("log", None)
        rows.append({"setup": label, **result})
    return rows


def scaling_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["evaluation_ms"]
    lines = ["| setup | ratings per worker | eval ms | vs 1 device | all-reduce ms | all-reduce share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        reduce = r.get("all_reduce_ms")
        cells = [r["setup"], str(r["rows"]), f"{r['evaluation_ms']:.2f}", f"{r['evaluation_ms'] / base:.2f}x",
                 f"{reduce:.2f}" if reduce else "-", f"{reduce / r['evaluation_ms']:.0%}" if reduce else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=JOBS, help="run one worker of a job (launch() starts them)")
    parser.add_argument("--out", help="where the worker writes its result")
    parser.add_argument("--params", default="{}")
    parser.add_argument("--bench", metavar="SIZE", help="the scaling benchmark on the factorization at SIZE")
    args = parser.parse_args(argv)
    if args.bench:
        rows = scaling(args.bench)
        print(scaling_table(rows))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        return 0
    result = _worker(args.job, json.loads(args.params))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
