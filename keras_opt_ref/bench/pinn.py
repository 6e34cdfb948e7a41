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
from typing import Any

import numpy as np

from .workloads import checked_choice

__all__ = ["PINN_SIZES", "PINNS", "Pinn", "exact_solution", "make_pinn", "relative_l2_error"]

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
