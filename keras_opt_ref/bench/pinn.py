"""Physics-informed workloads: Poisson and viscous Burgers problems, written as Keras users write them.

The loss differentiates the network with respect to its *inputs*: a ``keras.Model`` subclass whose
``compute_loss`` takes the PDE residual at the collocation points (``x`` of ``fit``), plus the initial and
boundary conditions at fixed points the model holds. ``y`` is unused (zeros). The loss is the mean squared
residual plus the mean squared misfit of the conditions. The objective's gradient is thus a third derivative
of the network, and its Hessian-vector product a fourth.

- ``poisson1d``: ``-u'' = pi^2 sin(pi x)`` on (0, 1), ``u(0) = u(1) = 0``; exact ``u = sin(pi x)``.
- ``poisson2d``: ``-(u_xx + u_yy) = 2 pi^2 sin(pi x) sin(pi y)`` on the unit square, ``u = 0`` on its
  boundary; exact ``u = sin(pi x) sin(pi y)``.
- ``burgers1d``: the viscous Burgers equation ``u_t + u u_x = nu u_xx``, ``nu = 0.01 / pi``, for ``x`` in
  [-1, 1] and ``t`` in [0, 1], with ``u(0, x) = -sin(pi x)`` and ``u(t, -1) = u(t, 1) = 0``. A shock forms
  at ``x = 0``. The inputs are the columns ``(t, x)``. The reference solution is the Cole-Hopf transform,
  evaluated by Gauss-Hermite quadrature (:func:`burgers_solution`).

The input derivatives come from the backend's own autodiff, one small function per backend
(:func:`input_derivatives`): nested ``tf.GradientTape``s on TensorFlow (Keras 3 and tf-keras); ``jax.vmap``
of ``jax.jacfwd`` of ``jax.value_and_grad`` of the network as a function of one point on JAX (the Hessian in
the input, with the value and gradient on the side); ``torch.autograd.grad`` with ``create_graph=True`` on
torch. Keras 3.15.1 computes parts of a float64 model in float32 on JAX (``tanh``, ``sin``, ``mean``) and on
torch (``matmul``, so ``Dense``, and ``mean``); the workloads run as Keras computes them there.

Sizes (:data:`PINN_SIZES`): collocation points, condition points, width and depth of the tanh network.
``burgers1d-small`` (1,024 points, 20x4) reached a relative L2 error of 0.17 after 500 L-BFGS-B iterations
and 0.16 after 3,000 (59 s on 2 cores, TensorFlow): the shock limits what the small sizes reach.

:func:`make_pinn` builds one (deterministic data and weights); :func:`relative_l2_error` measures a
trained model against the reference solution on a fixed grid.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import numpy as np

from .workloads import checked_choice

__all__ = ["BURGERS_NU", "PINN_SIZES", "PINNS", "Pinn", "burgers_solution", "exact_solution", "input_derivatives",
           "make_pinn", "relative_l2_error"]

PINNS = ("poisson1d", "poisson2d", "burgers1d")
# size: (collocation points, boundary (and initial) points, hidden width, hidden layers)
PINN_SIZES = {
    "poisson1d": {"small": (64, 2, 16, 2), "medium": (512, 2, 32, 2), "large": (4096, 2, 64, 3)},
    "poisson2d": {"small": (256, 64, 16, 2), "medium": (2048, 256, 32, 3), "large": (16384, 1024, 64, 3)},
    "burgers1d": {"small": (1024, 256, 20, 4), "medium": (4096, 512, 32, 6), "large": (16384, 1024, 20, 8)},
}
BURGERS_NU = 0.01 / np.pi
DIMENSIONS = {"poisson1d": 1, "poisson2d": 2, "burgers1d": 2}


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


# ---------------------------------------------------------------------------------------- reference solutions
def burgers_solution(t: Any, x: Any, nodes: int = 200) -> np.ndarray:
    """The viscous Burgers solution ``u(t, x)`` (``nu = BURGERS_NU``, ``u(0, x) = -sin(pi x)``) by Cole-Hopf.

    With ``u = -2 nu phi_x / phi`` the equation becomes the heat equation for ``phi``, whose solution is the
    initial ``phi(0, y) = exp(-cos(pi y) / (2 pi nu))`` convolved with the heat kernel. Substituting
    ``y = x - sqrt(4 nu t) z`` leaves Gaussian weights ``exp(-z^2)``:

        u(t, x) = -sum_i w_i sin(pi y_i) phi(0, y_i) / sum_i w_i phi(0, y_i),   y_i = x - sqrt(4 nu t) z_i

    with the Gauss-Hermite nodes ``z_i`` and weights ``w_i``. ``phi(0, y)`` spans ``exp(+-50)``; the sums
    are taken over ``exp(log w_i + log phi(0, y_i) - max)``. 100 nodes agree with 200 to 1e-15 on the
    error grid; NumPy's nodes overflow above about 360.
    """
    t, x = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(x, dtype=np.float64))
    z, w = np.polynomial.hermite.hermgauss(nodes)
    y = x[..., None] - np.sqrt(4 * BURGERS_NU * t)[..., None] * z
    exponent = np.log(w) - np.cos(np.pi * y) / (2 * np.pi * BURGERS_NU)
    weights = np.exp(exponent - exponent.max(axis=-1, keepdims=True))
    return -(weights * np.sin(np.pi * y)).sum(axis=-1) / weights.sum(axis=-1)


def exact_solution(name: str, points: np.ndarray) -> np.ndarray:
    """The reference solution at ``points`` (shape ``(n, dim)``; ``(t, x)`` for burgers1d), shape ``(n, 1)``."""
    if name == "burgers1d":
        return burgers_solution(points[:, 0], points[:, 1])[:, None]
    return np.prod(np.sin(np.pi * points), axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- the data
def _conditions(name: str, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The points where the model is held to known values (boundary, and initial for burgers1d), and those values."""
    if name == "poisson1d":
        return np.array([[0.0], [1.0]]), np.zeros((2, 1))
    side = count // 4
    s = np.sort(rng.uniform(size=side))
    zeros, ones = np.zeros(side), np.ones(side)
    if name == "poisson2d":
        points = np.concatenate([np.stack(p, axis=1) for p in ((s, zeros), (s, ones), (zeros, s), (ones, s))])
        return points, np.zeros((len(points), 1))
    x0 = np.sort(rng.uniform(-1.0, 1.0, size=count - 2 * side))  # burgers1d, columns (t, x)
    points = np.concatenate([np.stack((np.zeros_like(x0), x0), axis=1), np.stack((s, -ones), axis=1),
                             np.stack((s, ones), axis=1)])
    values = np.concatenate([-np.sin(np.pi * x0), np.zeros(2 * side)])[:, None]
    return points, values


def make_pinn(name: str, size: str = "small", *, keras: Any = None, dtype: str = "float64") -> Pinn:
    """Build PINN workload ``name`` at ``size``: the compiled model, the collocation points and zeros."""
    keras = checked_choice(PINN_SIZES, name, size, "PINN workload", keras)
    points, condition_points, width, depth = PINN_SIZES[name][size]
    dim = DIMENSIONS[name]
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(points, dim))
    if name == "burgers1d":
        x[:, 1] = 2 * x[:, 1] - 1  # (t, x) in [0, 1] x [-1, 1]
    conditions = _conditions(name, condition_points, rng)
    keras.utils.set_random_seed(0)
    model = _pinn_model(keras, name, width, depth, conditions, dtype)
    model.compile(loss="mse")
    return Pinn(name, size, model, x.astype(dtype), np.zeros((points, 1), dtype=dtype))


# ------------------------------------------------------------------- input derivatives, one function per backend
def _tensorflow_derivatives(net: Any, x: Any, second: tuple[int, ...]) -> tuple[Any, Any, Any]:
    import tensorflow as tf

    with tf.GradientTape(persistent=True) as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            u = net(x)
        du = inner.gradient(u, x)  # (n, dim): the rows are independent, so d(sum u)/dx is per point
        parts = [du[:, i] for i in second]
    d2u = tf.stack([outer.gradient(part, x)[:, i] for part, i in zip(parts, second, strict=True)], axis=1)
    del outer
    return u[:, 0], du, d2u


def _jax_derivatives(net: Any, x: Any, second: tuple[int, ...]) -> tuple[Any, Any, Any]:
    import jax

    def u(point: Any) -> Any:  # the network as a function of one input point
        return net(point[None, :])[0, 0]

    def gradient(point: Any) -> tuple[Any, Any]:  # and, as jax.jacfwd's aux, the value and the gradient
        value, grad = jax.value_and_grad(u)(point)
        return grad, (value, grad)

    hessians, (values, du) = jax.vmap(jax.jacfwd(gradient, has_aux=True))(x)  # one pass: (n, dim, dim), ...
    axes = list(second)
    return values, du, hessians[:, axes, axes]


def _torch_derivatives(net: Any, x: Any, second: tuple[int, ...]) -> tuple[Any, Any, Any]:
    import torch

    with torch.enable_grad():  # Keras's evaluate (and the objective's value) run compute_loss under no_grad
        x = x.detach().requires_grad_(True)
        u = net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]  # rows independent: per point
        d2u = torch.stack([torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in second], 1)
    return u[:, 0], du, d2u


def input_derivatives(keras: Any, net: Any, x: Any, second: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """``u = net(x)`` (shape ``(n,)``), its gradient in the input (``(n, dim)``) and the pure second
    derivatives ``d^2 u / dx_i^2`` for ``i`` in ``second`` (``(n, len(second))``), by the autodiff of the
    backend ``keras`` runs on; differentiable in the network's weights."""
    backend = keras.backend.backend()
    return {"tensorflow": _tensorflow_derivatives, "jax": _jax_derivatives, "torch": _torch_derivatives}[backend](
        net, x, second)


def _ops(keras: Any) -> Any:
    """``keras.ops`` on Keras 3; the few TensorFlow functions the residuals use on tf-keras."""
    if hasattr(keras, "ops"):
        return keras.ops
    import tensorflow as tf

    return types.SimpleNamespace(cast=tf.cast, convert_to_tensor=tf.convert_to_tensor, sin=tf.sin,
                                 mean=tf.reduce_mean, prod=tf.reduce_prod, sum=tf.reduce_sum)


# ------------------------------------------------------------------------------------------- the model
def _residual(name: str, ops: Any, x: Any, u: Any, du: Any, d2u: Any) -> Any:
    """The PDE's residual at the collocation points (zero for the exact solution)."""
    if name == "burgers1d":  # columns (t, x); d2u holds u_xx only
        return du[:, 0] + u * du[:, 1] - BURGERS_NU * d2u[:, 0]
    dim = x.shape[1]
    forcing = dim * np.pi**2 * ops.prod(ops.sin(np.pi * x), axis=1)
    return -ops.sum(d2u, axis=1) - forcing


def _pinn_model(keras: Any, name: str, width: int, depth: int, conditions: tuple[np.ndarray, np.ndarray],
                dtype: str) -> Any:
    ops = _ops(keras)
    dim = DIMENSIONS[name]
    second = (1,) if name == "burgers1d" else tuple(range(dim))  # u_xx for Burgers; the Laplacian for Poisson

    class PhysicsInformed(keras.Model):
        """The PDE's residual at the collocation points, the known values at the condition points; the loss
        is the mean squared residual plus the mean squared misfit at the condition points."""

        def __init__(self) -> None:
            super().__init__()
            layers = [keras.layers.Dense(width, activation="tanh", dtype=dtype) for _ in range(depth)]
            self.net = keras.Sequential([keras.Input((dim,), dtype=dtype), *layers,
                                         keras.layers.Dense(1, dtype=dtype)])
            self.condition_points = ops.convert_to_tensor(conditions[0], dtype=dtype)
            self.condition_values = ops.convert_to_tensor(conditions[1], dtype=dtype)

        def call(self, x: Any) -> Any:
            return self.net(x)

        def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                         **kwargs: Any) -> Any:
            x = ops.cast(x, dtype)  # fit's data adapters hand floats over in floatx (float32 by default)
            u, du, d2u = input_derivatives(keras, self.net, x, second)
            residual = _residual(name, ops, x, u, du, d2u)
            misfit = self.net(self.condition_points) - self.condition_values
            return ops.mean(residual**2) + ops.mean(misfit**2)

    model = PhysicsInformed()
    model(np.zeros((1, dim), dtype=dtype))  # build
    return model


# --------------------------------------------------------------------------------------------- the error
@functools.lru_cache(maxsize=8)
def _grid(name: str, points: int) -> tuple[np.ndarray, np.ndarray]:
    """The error grid and the reference solution on it: ``points`` per axis on the unit interval or square;
    for burgers1d ``points`` times in [0, 1] by ``2 points - 1`` positions in [-1, 1]."""
    axis = np.linspace(0.0, 1.0, points)
    if name == "poisson1d":
        grid = axis[:, None]
    else:
        second = np.linspace(-1.0, 1.0, 2 * points - 1) if name == "burgers1d" else axis
        ga, gb = np.meshgrid(axis, second, indexing="ij")
        grid = np.stack([ga.ravel(), gb.ravel()], axis=1)
    return grid, exact_solution(name, grid)


def relative_l2_error(pinn: Pinn, points: int = 101) -> float:
    """``||u - u_exact|| / ||u_exact||`` on a uniform grid (``points`` per axis; see ``_grid``)."""
    grid, exact = _grid(pinn.name, points)
    u = np.asarray(pinn.model.predict_on_batch(grid.astype(pinn.x.dtype)), dtype=np.float64)
    return float(np.linalg.norm(u - exact) / np.linalg.norm(exact))
