"""Time to a relative L2 error target on a PINN workload (:mod:`keras_opt_ref.bench.pinn`), one contender per call.

Each contender starts from the same weights (``make_pinn`` is deterministic); the error against the exact
solution is checked every ``check_every`` epochs or iterations and the checks' own time is not counted.
Call it in a fresh process per contender for a fair comparison.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .pinn import make_pinn, relative_l2_error

__all__ = ["CONTENDERS", "time_to_error"]

CONTENDERS = ("adam", "adam+reference", "adam+hand-written")


def time_to_error(contender: str, name: str = "poisson2d", size: str = "small", *, target: float = 1e-2,
                  adam_epochs: int = 100, learning_rate: float = 5e-3, maxiter: int = 5000,
                  check_every: int = 10, keras: Any = None) -> dict[str, Any]:
    """Seconds until the relative L2 error reaches ``target`` (checked every ``check_every`` epochs or
    iterations; the checks' own time is not counted), for one ``contender``:

    - ``"adam"``: Keras's Adam on the full batch, up to ``maxiter`` steps;
    - ``"adam+reference"``: ``adam_epochs`` Adam steps, then keras_opt_ref's L-BFGS-B (a callback stops it);
    - ``"adam+hand-written"``: the same Adam steps, then L-BFGS-B the way PINN code is often written by
      hand: ``set_weights`` from the flat vector at every call and a compiled loss-and-gradient of the
      model's ``compute_loss`` in the model's dtype.

    Returns the seconds (``None`` if the target was not reached), the error reached, and the steps.
    """
    import time

    import scipy.optimize
    import tensorflow as tf

    if keras is None:
        from ..base.keras_compat import default_keras

        keras = default_keras()
    if contender not in CONTENDERS:
        raise ValueError(f"Unknown contender {contender!r}; choose one of {CONTENDERS}")
    work = make_pinn(name, size, keras=keras)
    model, X, y = work.model, work.x, work.y
    clock = {"start": time.perf_counter(), "checking": 0.0, "reached": None, "error": math.inf, "steps": 0}

    def check(steps: int) -> bool:
        began = time.perf_counter()
        clock["error"], clock["steps"] = relative_l2_error(work), steps
        if clock["error"] <= target and clock["reached"] is None:
            clock["reached"] = began - clock["start"] - clock["checking"]
        clock["checking"] += time.perf_counter() - began
        return clock["reached"] is not None

    class Check(keras.callbacks.Callback):
        def __init__(self, offset: int = 0) -> None:
            super().__init__()
            self.offset = offset

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if (epoch + 1) % check_every == 0 and check(self.offset + epoch + 1):
                self.model.stop_training = True

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    adam_steps = maxiter if contender == "adam" else adam_epochs
    model.fit(X, y, batch_size=len(X), epochs=adam_steps, verbose=0, callbacks=[Check()])
    if contender == "adam+reference" and clock["reached"] is None:
        model.train_function = _reference_train_function(model, maxiter, [Check(adam_steps)])
        model.fit(X, y, batch_size=len(X), verbose=0)
    elif contender == "adam+hand-written" and clock["reached"] is None:
        _hand_written_lbfgs(model, X, y, maxiter, lambda k: k % check_every == 0 and check(adam_steps + k), tf,
                            scipy.optimize)
    if clock["reached"] is None:
        check(clock["steps"])
    return {"contender": contender, "workload": work.label, "target": target, "seconds": clock["reached"],
            "error": clock["error"], "steps": clock["steps"]}


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
