"""Physics-informed workloads: Poisson problems with closed-form solutions, written as Keras users write them.

The loss differentiates the network with respect to its *inputs*: a ``keras.Model`` subclass whose
``compute_loss`` takes the PDE residual at the collocation points (``x`` of ``fit``) with nested
``tf.GradientTape``s, plus the boundary condition at fixed boundary points. ``y`` is unused (zeros).
So the objective's gradient is a third derivative of the network and its Hessian-vector product a
fourth; the TensorFlow backend (Keras 3 and tf-keras) computes them. JAX and torch: not yet.

- ``poisson1d``: ``-u'' = pi^2 sin(pi x)`` on (0, 1), ``u(0) = u(1) = 0``; exact ``u = sin(pi x)``.
- ``poisson2d``: ``-(u_xx + u_yy) = 2 pi^2 sin(pi x) sin(pi y)`` on the unit square, ``u = 0`` on its
  boundary; exact ``u = sin(pi x) sin(pi y)``.

:func:`make_pinn` builds one (deterministic data and weights); :func:`relative_l2_error` measures a
trained model against the exact solution on a fixed grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .workloads import checked_choice

__all__ = ["CONTENDERS", "PINN_SIZES", "PINNS", "Pinn", "exact_solution", "make_pinn", "relative_l2_error",
           "time_to_error"]

PINNS = ("poisson1d", "poisson2d")
# size: (collocation points, boundary points, hidden width, hidden layers)
PINN_SIZES = {
    "poisson1d": {"small": (64, 2, 16, 2), "medium": (512, 2, 32, 2), "large": (4096, 2, 64, 3)},
    "poisson2d": {"small": (256, 64, 16, 2), "medium": (2048, 256, 32, 3), "large": (16384, 1024, 64, 3)},
}


@dataclasses.dataclass
class Pinn:
    name: str
    size: str
    model: Any
    x: np.ndarray  # collocation points, fit's x
    y: np.ndarray  # zeros, fit's y (unused by the loss)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.size}"


def exact_solution(name: str, points: np.ndarray) -> np.ndarray:
    """The closed-form solution at ``points`` (shape ``(n, dim)``), shape ``(n, 1)``."""
    return np.prod(np.sin(np.pi * points), axis=1, keepdims=True)


def _boundary(name: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if name == "poisson1d":
        return np.array([[0.0], [1.0]])
    side = count // 4
    t = np.sort(rng.uniform(size=side))
    zeros, ones = np.zeros(side), np.ones(side)
    return np.concatenate([np.stack(p, axis=1) for p in ((t, zeros), (t, ones), (zeros, t), (ones, t))])


def make_pinn(name: str, size: str = "small", *, keras: Any = None, dtype: str = "float64") -> Pinn:
    """Build PINN workload ``name`` at ``size``: the compiled model, the collocation points and zeros."""
    keras = checked_choice(PINN_SIZES, name, size, "PINN workload", keras)
    points, boundary_points, width, depth = PINN_SIZES[name][size]
    dim = 1 if name == "poisson1d" else 2
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(points, dim))
    boundary = _boundary(name, boundary_points, rng)
    keras.utils.set_random_seed(0)
    model = _poisson_model(keras, dim, width, depth, boundary, dtype)
    model.compile(loss="mse")
    return Pinn(name, size, model, x.astype(dtype), np.zeros((points, 1), dtype=dtype))


def _poisson_model(keras: Any, dim: int, width: int, depth: int, boundary: np.ndarray, dtype: str) -> Any:
    import tensorflow as tf

    class PoissonPinn(keras.Model):
        """``-laplace(u) = f`` at the collocation points, ``u = 0`` at the boundary points; the loss is
        the mean squared residual plus the mean squared boundary value."""

        def __init__(self) -> None:
            super().__init__()
            layers = [keras.layers.Dense(width, activation="tanh", dtype=dtype) for _ in range(depth)]
            self.net = keras.Sequential([keras.Input((dim,), dtype=dtype), *layers,
                                         keras.layers.Dense(1, dtype=dtype)])
            self.boundary = tf.constant(boundary, dtype=dtype)

        def call(self, x: Any) -> Any:
            return self.net(x)

        def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                         **kwargs: Any) -> Any:
            x = tf.cast(x, dtype)  # fit's data adapters hand floats over in floatx (float32 by default)
            with tf.GradientTape(persistent=True) as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    u = self.net(x)
                du = inner.gradient(u, x)  # (n, dim)
                parts = [du[:, i] for i in range(dim)]
            laplace = tf.add_n([outer.gradient(parts[i], x)[:, i] for i in range(dim)])
            del outer
            pi = tf.constant(np.pi, x.dtype)
            f = dim * pi**2 * tf.reduce_prod(tf.sin(pi * x), axis=1)
            residual = -laplace - f
            return tf.reduce_mean(residual**2) + tf.reduce_mean(self.net(self.boundary) ** 2)

    model = PoissonPinn()
    model(np.zeros((1, dim), dtype=dtype))  # build
    return model


def relative_l2_error(pinn: Pinn, points: int = 101) -> float:
    """``||u - u_exact|| / ||u_exact||`` on a uniform grid (``points`` per axis)."""
    axis = np.linspace(0.0, 1.0, points)
    if pinn.name == "poisson1d":
        grid = axis[:, None]
    else:
        gx, gy = np.meshgrid(axis, axis, indexing="ij")
        grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    u = np.asarray(pinn.model.predict_on_batch(grid.astype(pinn.x.dtype)), dtype=np.float64)
    exact = exact_solution(pinn.name, grid)
    return float(np.linalg.norm(u - exact) / np.linalg.norm(exact))


# ------------------------------------------------------------------ time to an error target
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
