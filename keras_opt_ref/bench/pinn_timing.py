"""Time to a relative L2 error target on a PINN workload (:mod:`keras_opt_ref.bench.pinn`).

:func:`time_to_error` times one contender in the calling process; :func:`race` runs every contender in
a fresh process of its own (``python -m keras_opt_ref.bench.pinn_timing``), so that no contender inherits
another's compiled functions, threads or memory, and gives each one's seconds over the reference's.
Each contender starts from the same weights (``make_pinn`` is deterministic) and the same Adam steps;
the error against the exact solution is checked every ``check_every`` epochs or iterations, and the
checks' own time is not counted. Tracing and compilation are counted: a user pays them.

The contenders, as PINN code is written (the L-BFGS part of the usual recipe, Adam then L-BFGS):

- ``adam``: Keras's Adam on the full batch alone;
- ``adam+reference``: keras_opt_ref's L-BFGS-B through ``fit``, on the process's Keras backend;
- ``adam+hand-written``: a ``get_weights``/``set_weights`` L-BFGS-B wrapper around a ``tf.function``
  loss and gradient of ``compute_loss``, float64 (the same math as the reference);
- ``adam+hand-written-float32``: the same wrapper on the model built in float32, as most tutorials do;
- ``adam+tfp``: ``tfp.optimizer.lbfgs_minimize`` on a "function factory": one ``tf.function`` taking the
  flat position, assigning it to the variables and returning the loss and the flat gradient, float64;
  ``lbfgs_minimize`` itself called eagerly, as the recipe is usually written;
- ``adam+tfp-graph``: the same with ``lbfgs_minimize`` inside a ``tf.function`` (its loop in the graph).

Adam alone gets ``adam_alone_steps`` steps (3,000 by default), not the L-BFGS iteration limit.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import child
from .pinn import make_pinn, relative_l2_error

__all__ = ["CONTENDERS", "REFERENCE_BACKENDS", "in_a_process", "race", "skip_reason", "time_to_error"]

CONTENDERS = ("adam", "adam+reference", "adam+hand-written", "adam+hand-written-float32", "adam+tfp",
              "adam+tfp-graph")
REFERENCE_BACKENDS = ("tensorflow", "jax", "torch")
_TENSORFLOW_ONLY = ("adam+hand-written", "adam+hand-written-float32", "adam+tfp", "adam+tfp-graph")


def time_to_error(contender: str, name: str = "poisson2d", size: str = "small", *, target: float = 1e-2,
                  adam_epochs: int = 100, learning_rate: float = 5e-3, maxiter: int = 5000,
                  check_every: int = 10, adam_alone_steps: int = 3000, keras: Any = None) -> dict[str, Any]:
    """Seconds until the relative L2 error reaches ``target`` (checked every ``check_every`` epochs or
    iterations; the checks' own time is not counted), for one ``contender``:

    - ``"adam"``: Keras's Adam on the full batch, up to ``adam_alone_steps`` steps;
    - ``"adam+reference"``: ``adam_epochs`` Adam steps, then keras_opt_ref's L-BFGS-B (a callback stops it);
    - ``"adam+hand-written"``: the same Adam steps, then L-BFGS-B the way PINN code is often written by
      hand: ``set_weights`` from the flat vector at every call and a compiled loss-and-gradient of the
      model's ``compute_loss`` in the model's dtype;
    - ``"adam+hand-written-float32"``: the same on the model built in float32;
    - ``"adam+tfp"``: the same Adam steps, then ``tfp.optimizer.lbfgs_minimize`` (function factory);
    - ``"adam+tfp-graph"``: the same, ``lbfgs_minimize`` inside a ``tf.function``.

    Returns the seconds (``None`` if the target was not reached), the error reached, and the steps.
    """
    import time

    if keras is None:
        from ..base.keras_compat import default_keras

        keras = default_keras()
    if contender not in CONTENDERS:
        raise ValueError(f"Unknown contender {contender!r}; choose one of {CONTENDERS}")
    if contender in _TENSORFLOW_ONLY and hasattr(keras, "ops") and keras.backend.backend() != "tensorflow":
        raise ValueError(f"Contender {contender!r} is written with TensorFlow; run it with KERAS_BACKEND=tensorflow")
    work = make_pinn(name, size, keras=keras, dtype="float32" if contender.endswith("float32") else "float64")
    model, X, y = work.model, work.x, work.y
    clock = {"start": time.perf_counter(), "checking": 0.0, "reached": None, "error": math.inf, "steps": 0,
             "done": 0}

    def check(steps: int) -> bool:
        began = time.perf_counter()
        clock["error"], clock["steps"] = relative_l2_error(work), steps
        if clock["error"] <= target and clock["reached"] is None:
            clock["reached"] = began - clock["start"] - clock["checking"]
        clock["checking"] += time.perf_counter() - began
        return clock["reached"] is not None

    def after(steps: int, due: bool) -> bool:
        """``steps`` taken in all; the error is checked if ``due``. Whether the target is reached."""
        clock["done"] = steps
        return due and check(steps)

    class Check(keras.callbacks.Callback):
        def __init__(self, offset: int = 0) -> None:
            super().__init__()
            self.offset = offset

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if after(self.offset + epoch + 1, (epoch + 1) % check_every == 0):
                self.model.stop_training = True

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    adam_steps = adam_alone_steps if contender == "adam" else adam_epochs
    model.fit(X, y, batch_size=len(X), epochs=adam_steps, verbose=0, callbacks=[Check()])
    if contender == "adam+reference" and clock["reached"] is None:
        model.train_function = _reference_train_function(model, maxiter, [Check(adam_steps)])
        model.fit(X, y, batch_size=len(X), verbose=0)
    elif contender.startswith("adam+hand-written") and clock["reached"] is None:
        import scipy.optimize
        import tensorflow as tf

        _hand_written_lbfgs(model, X, y, maxiter, lambda k: after(adam_steps + k, k % check_every == 0), tf,
                            scipy.optimize)
    elif contender.startswith("adam+tfp") and clock["reached"] is None:
        import tensorflow as tf

        _tfp_lbfgs(model, X, y, maxiter, check_every, lambda k: after(adam_steps + k, True), tf,
                   in_graph=contender == "adam+tfp-graph")
    if clock["reached"] is None:
        check(clock["done"])  # the error where the contender stopped
    backend = keras.backend.backend() if hasattr(keras, "ops") else "tensorflow"
    return {"contender": contender, "backend": backend, "workload": work.label, "target": target,
            "seconds": clock["reached"], "error": clock["error"], "steps": clock["steps"],
            "total seconds": time.perf_counter() - clock["start"] - clock["checking"]}


def _reference_train_function(model: Any, maxiter: int, callbacks: list[Any]) -> Any:
    from .. import scipy_optimizer

    return scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=maxiter, callbacks=callbacks)


def _hand_written_lbfgs(model: Any, X: np.ndarray, y: np.ndarray, maxiter: int, stop: Any, tf: Any,
                        optimize: Any) -> None:
    """The hand-written wrapper: flat vector -> set_weights -> compiled loss and gradient -> float64."""
    shapes = [w.shape for w in model.get_weights()]
    sizes = [int(np.prod(s)) for s in shapes]
    x_tensor, y_tensor = tf.constant(X), tf.constant(y)

    @tf.function
    def loss_and_grads() -> Any:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x_tensor, y=y_tensor, y_pred=None)
        return loss, tape.gradient(loss, model.trainable_variables)

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        model.set_weights([part.reshape(s) for part, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes,
                                                             strict=True)])
        loss, grads = loss_and_grads()
        return float(loss), np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in grads])

    iterations = [0]

    def callback(intermediate_result: Any) -> None:
        iterations[0] += 1
        if stop(iterations[0]):
            raise StopIteration

    x0 = np.concatenate([w.ravel() for w in model.get_weights()]).astype(np.float64)
    result = optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", callback=callback,
                               options={"maxiter": maxiter})
    fun(result.x)


def _tfp_lbfgs(model: Any, X: np.ndarray, y: np.ndarray, maxiter: int, check_every: int, stop: Any, tf: Any, *,
               in_graph: bool = False) -> None:
    """tfp's L-BFGS on a function factory: a ``tf.function`` of the flat position that assigns it to the
    variables and returns the loss and the flat gradient. Run ``check_every`` iterations at a time, each
    call continuing the last one's state (``previous_optimizer_results``: the curvature pairs are kept);
    ``in_graph``: each call to ``lbfgs_minimize`` inside a ``tf.function`` (traced once for the start, once
    for the continuations), else eagerly."""
    import tensorflow_probability as tfp

    variables = model.trainable_variables
    shapes = [v.shape for v in variables]
    sizes = [int(np.prod(shape)) for shape in shapes]
    x_tensor, y_tensor = tf.constant(X), tf.constant(y)

    @tf.function
    def value_and_gradients(position: Any) -> Any:
        for variable, part, shape in zip(variables, tf.split(position, sizes), shapes, strict=True):
            variable.assign(tf.reshape(part, shape))
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x_tensor, y=y_tensor, y_pred=None)
        gradients = tape.gradient(loss, variables)
        return loss, tf.concat([tf.reshape(g, [-1]) for g in gradients], axis=0)

    def begin(position: Any, limit: Any) -> Any:
        return tfp.optimizer.lbfgs_minimize(value_and_gradients, initial_position=position, max_iterations=limit,
                                            tolerance=1e-12)

    def resume(previous: Any, limit: Any) -> Any:
        return tfp.optimizer.lbfgs_minimize(value_and_gradients, initial_position=None,
                                            previous_optimizer_results=previous, max_iterations=limit,
                                            tolerance=1e-12)

    if in_graph:
        begin, resume = tf.function(begin), tf.function(resume)
    start = tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0)
    results, done = None, 0
    while done < maxiter:
        requested = min(done + check_every, maxiter)
        limit = tf.constant(requested)  # a tensor: one trace for every limit
        results = begin(start, limit) if results is None else resume(results, limit)
        done = int(results.num_iterations)
        value_and_gradients(results.position)  # the variables hold the iterate, not the last point tried
        if stop(done) or bool(results.converged) or bool(results.failed) or done < requested:
            break


# ------------------------------------------------------------------ every contender in its own process
def race(name: str = "poisson2d", size: str = "small", *, target: float = 1e-2,
         contenders: Sequence[str] = CONTENDERS, backends: Sequence[str] = REFERENCE_BACKENDS,
         adam_epochs: int = 100, maxiter: int = 5000, check_every: int = 10, adam_alone_steps: int = 3000,
         timeout: float = 1800.0, say: Any = print) -> dict[str, Any]:
    """:func:`time_to_error` for each contender (``adam+reference`` once per Keras backend in ``backends``
    that is installed), each in a fresh process, one after another. Returns the rows by label and each
    one's seconds over the reference's on TensorFlow (``/ reference``; ``None`` where either did not
    reach the target)."""
    rows: dict[str, dict[str, Any]] = {}
    runs = [(c, "tensorflow") for c in contenders if c != "adam+reference"]
    runs = [(c, b) for c in contenders if c == "adam+reference" for b in backends] + runs
    for contender, backend in runs:
        label = f"{contender} ({backend})" if contender == "adam+reference" else contender
        reason = skip_reason(contender, backend)
        if reason:
            rows[label] = {"skipped": reason}
            say(f"{label}: left out, {reason}")
            continue
        rows[label] = row = in_a_process(contender, backend, name=name, size=size, target=target,
                                         adam_epochs=adam_epochs, maxiter=maxiter, check_every=check_every,
                                         adam_alone_steps=adam_alone_steps, timeout=timeout)
        say(_row_line(label, row))
    reference = rows.get("adam+reference (tensorflow)", {}).get("seconds")
    for row in rows.values():
        seconds = row.get("seconds")
        row["/ reference"] = seconds / reference if seconds is not None and reference else None
    return {"workload": f"{name}-{size}", "target": target, "adam_epochs": adam_epochs, "maxiter": maxiter,
            "check_every": check_every, "rows": rows}


def _row_line(label: str, row: dict[str, Any]) -> str:
    if "failed" in row:
        return f"{label}: failed, {row['failed']}"
    seconds = "not reached" if row["seconds"] is None else f"{row['seconds']:.1f} s"
    return (f"{label}: {seconds} to {row['target']:g} (error {row['error']:.3g} after {row['steps']} steps, "
            f"{row['total seconds']:.1f} s in all)")


def skip_reason(contender: str, backend: str) -> str:
    """Why ``contender`` cannot run on ``backend`` here (a package missing), or ``""``."""
    import importlib.util

    needed = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend]
    if importlib.util.find_spec(needed) is None:
        return f"{needed} is not installed"
    if contender.startswith("adam+tfp") and importlib.util.find_spec("tensorflow_probability") is None:
        return "tensorflow_probability is not installed"
    return ""


def in_a_process(contender: str, backend: str, *, name: str, size: str, target: float, adam_epochs: int,
                 maxiter: int, check_every: int, adam_alone_steps: int = 3000,
                 timeout: float = 1800.0) -> dict[str, Any]:
    """:func:`time_to_error` in a fresh Python process with ``KERAS_BACKEND=backend`` (its JSON row, or
    ``{"failed": why}``)."""
    env = {"KERAS_BACKEND": backend, **({"JAX_ENABLE_X64": "1"} if backend == "jax" else {})}
    args = [contender, name, size, "--target", repr(target), "--adam-epochs", str(adam_epochs), "--maxiter",
            str(maxiter), "--check-every", str(check_every), "--adam-alone-steps", str(adam_alone_steps)]
    return child.json_row("keras_opt_ref.bench.pinn_timing", args, env=env, timeout=timeout,
                          drop=() if backend == "tensorflow" else ("TF_USE_LEGACY_KERAS",))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="one PINN contender's time to an error target (JSON on stdout)")
    parser.add_argument("contender", choices=CONTENDERS)
    parser.add_argument("name")
    parser.add_argument("size")
    parser.add_argument("--target", type=float, default=1e-2)
    parser.add_argument("--adam-epochs", type=int, default=100)
    parser.add_argument("--maxiter", type=int, default=5000)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--adam-alone-steps", type=int, default=3000)
    args = parser.parse_args(argv)
    row = time_to_error(args.contender, args.name, args.size, target=args.target, adam_epochs=args.adam_epochs,
                        maxiter=args.maxiter, check_every=args.check_every, adam_alone_steps=args.adam_alone_steps)
    print(json.dumps({**row, "pid": os.getpid()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
