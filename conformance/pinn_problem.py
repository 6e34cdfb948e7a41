"""The suite's physics-informed problem: a loss that differentiates the network with respect to its inputs.

A 1-D Poisson problem, ``-u''(x) = pi^2 sin(pi x)`` on (0, 1) with ``u(0) = u(1) = 0``, written as Keras users
write a PINN: a ``keras.Model`` subclass whose ``compute_loss`` takes the second derivative of the network with
respect to fit's ``x`` (the collocation points) with the autodiff of the backend under test (nested
``tf.GradientTape`` on TensorFlow, Keras 3 and tf-keras; ``jax.grad`` of ``jax.grad`` on JAX;
``torch.autograd.grad(create_graph=True)`` on torch) and returns the mean squared PDE residual plus the mean
squared boundary value. ``y`` is zeros and unused by the loss; the model is compiled with ``loss="mse"``, so an
implementation that bypasses the override minimizes ``mean(u(x)^2)``, which the suite can name.

The network: a non-trainable input scaling ``s = 2 (x - 0.5)`` (two frozen weights, as an input normalization
is), one tanh layer of width 8, a linear output: 25 trainable weights, float64, set from the suite's own
generator so that every backend starts at the same point. Its loss has a closed form in NumPy (``u''`` of a
one-layer tanh network), which gives the values and derivatives of what known bugs compute: the boundary term
alone, the residual term alone, the compiled loss, the mean over fit's batches, the Gauss-Newton product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .truth import _numpy, central_gradient, central_jacobian, set_trainable_vector, weights_set_to

POINTS = 40  # collocation points; fit's batches of 16 are uneven (16 + 16 + 8)
BATCH = 16
WIDTH = 8
SHIFT, SCALE = 0.5, 2.0  # the frozen input scaling
BOUNDARY = np.array([[0.0], [1.0]])


def backend_of(keras) -> str:
    return keras.backend.backend() if hasattr(keras.backend, "backend") else "tensorflow"


def _second_derivative_loss(backend: str, u, x, boundary: np.ndarray):
    """mean((-u''(x) - pi^2 sin(pi x))^2) + mean(u(boundary)^2), with u'' taken by the backend's own autodiff.
    The network acts on each row alone, so d/dx of sum(u) is u' row by row, and so for u''."""
    pi = np.pi
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x = jnp.asarray(x, dtype=jnp.float64)
        n = x.shape[0]
        points = jnp.concatenate([x, jnp.asarray(boundary, x.dtype)])  # one pass: boundary values come as aux
        du = jax.grad(lambda t: (jnp.sum(value := u(t)), value), has_aux=True)

        def slope(t):
            first, value = du(t)
            return jnp.sum(first), value

        d2u, values = jax.grad(slope, has_aux=True)(points)
        residual = -d2u[:n] - pi**2 * jnp.sin(pi * x)
        return jnp.mean(residual**2) + jnp.mean(values[n:] ** 2)
    if backend == "torch":
        import keras
        import torch

        x = keras.ops.convert_to_tensor(x, "float64").detach()
        with torch.enable_grad():  # a value may be asked for under torch.no_grad: the input derivatives need a graph
            x.requires_grad_(True)
            du = torch.autograd.grad(u(x).sum(), x, create_graph=True)[0]
            d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
            residual = -d2u - pi**2 * torch.sin(pi * x)
            edge = u(keras.ops.convert_to_tensor(boundary, "float64"))
            return torch.mean(residual**2) + torch.mean(edge**2)
    import tensorflow as tf

    x = tf.cast(tf.convert_to_tensor(x), tf.float64)  # fit's adapters may hand floats over in another dtype
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            value = u(x)
        du = inner.gradient(value, x)
    d2u = outer.gradient(du, x)
    residual = -d2u - pi**2 * tf.sin(pi * x)
    return tf.reduce_mean(residual**2) + tf.reduce_mean(u(tf.constant(boundary, tf.float64)) ** 2)


def poisson_model(keras):
    """The PINN model, built, float64, at the suite's start weights; compiled with loss="mse" (which its
    compute_loss ignores)."""
    backend = backend_of(keras)

    class InputScale(keras.layers.Layer):
        """s = scale * (x - shift), both frozen (non-trainable weights)."""

        def build(self, input_shape):
            constant = keras.initializers.Constant
            self.shift = self.add_weight(shape=(1,), initializer=constant(SHIFT), trainable=False, name="shift")
            self.scale = self.add_weight(shape=(1,), initializer=constant(SCALE), trainable=False, name="scale")

        def call(self, inputs):
            return (inputs - self.shift) * self.scale

    class PoissonPinn(keras.Model):
        def __init__(self):
            super().__init__(dtype="float64")
            self.scaling = InputScale(dtype="float64")
            self.hidden = keras.layers.Dense(WIDTH, activation="tanh", dtype="float64")
            self.head = keras.layers.Dense(1, dtype="float64")

        def u(self, x):
            return self.head(self.hidden(self.scaling(x)))

        def call(self, x):
            return self.u(x)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
            return _second_derivative_loss(backend, self.u, x, BOUNDARY)

    model = PoissonPinn()
    model(np.zeros((POINTS, 1)))  # build (at the shape of fit's data: eager backends compile their ops once)
    start = np.random.default_rng(23).normal(size=sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    set_trainable_vector(model, start)
    model.compile(loss="mse")
    return model


@dataclass
class PinnProblem:
    """The model, fit's data, and the NumPy closed form of the loss in the interface's layout."""

    model: Any
    x: np.ndarray
    y: np.ndarray
    start: np.ndarray  # the trainable weights before fit
    everything: np.ndarray  # model.weights (get_weights' order) before fit: trainable and frozen
    slices: dict[str, tuple[slice, tuple[int, ...]]]
    _trainable_mask: np.ndarray  # which entries of ``everything`` are trainable

    # ------------------------------------------------------------------ the model's own loss
    def compute_loss_at(self, w: np.ndarray, x: np.ndarray | None = None) -> float:
        """``model.compute_loss`` called directly on all collocation points (or ``x``) at trainable weights w."""
        x = self.x if x is None else x
        with weights_set_to(self.model, w):
            y = np.zeros((len(x), 1))
            return float(_numpy(self.model.compute_loss(x=x, y=y, y_pred=self.model(x), sample_weight=None)))

    # ------------------------------------------------------------------ closed form (NumPy, float64)
    def _params(self, w: np.ndarray):
        p = {k: np.asarray(w[s], dtype=np.float64).reshape(shape) for k, (s, shape) in self.slices.items()}
        return p["W1"].reshape(1, WIDTH), p["b1"].reshape(WIDTH), p["W2"].reshape(WIDTH, 1), p["b2"].reshape(1)

    def _u(self, w, x):
        W1, b1, W2, b2 = self._params(w)
        h = np.tanh(SCALE * (x - SHIFT) @ W1 + b1)
        return h @ W2 + b2, h

    def residual(self, w: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """-u''(x) - pi^2 sin(pi x) at each collocation point."""
        x = self.x if x is None else x
        W1, _, W2, _ = self._params(w)
        _, h = self._u(w, x)
        d2u = SCALE**2 * ((-2.0 * h * (1.0 - h**2)) * W1**2) @ W2
        return (-d2u - np.pi**2 * np.sin(np.pi * x)).ravel()

    def boundary_term(self, w: np.ndarray) -> float:
        return float(np.mean(self._u(w, BOUNDARY)[0] ** 2))

    def residual_term(self, w: np.ndarray, x: np.ndarray | None = None) -> float:
        return float(np.mean(self.residual(w, x) ** 2))

    def loss(self, w: np.ndarray) -> float:
        return self.residual_term(w) + self.boundary_term(w)

    def compiled_loss(self, w: np.ndarray) -> float:
        """What Keras's own compute_loss would give: mse of u(x) against fit's y (zeros)."""
        return float(np.mean(self._u(w, self.x)[0] ** 2))

    def per_batch_mean(self, w: np.ndarray) -> float:
        parts = [self.x[i : i + BATCH] for i in range(0, len(self.x), BATCH)]
        return float(np.mean([self.residual_term(w, part) + self.boundary_term(w) for part in parts]))

    def known_values(self, w: np.ndarray) -> dict[str, float]:
        return {
            "the boundary term alone: the PDE residual, the term with the network's input derivatives, is missing":
                self.boundary_term(w),
            "the PDE residual term alone: the boundary term is missing": self.residual_term(w),
            "the compiled loss (mse of u(x) against fit's y, zeros): the compute_loss override is bypassed":
                self.compiled_loss(w),
            f"the mean of compute_loss over fit's batches of {BATCH} ({self._batches()} points): the loss is not one "
            "compute_loss over all the collocation points": self.per_batch_mean(w),
        }

    def known_gradients(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "the gradient of the boundary term alone: the input-derivative term contributes nothing to it":
                central_gradient(self.boundary_term, w),
            "the gradient of the compiled loss (mse of u(x) against zeros): the compute_loss override is bypassed":
                central_gradient(self.compiled_loss, w),
        }

    def gauss_newton_product(self, w: np.ndarray, p: np.ndarray) -> np.ndarray:
        """2 J^T J p for the residuals r(w) = [residual / sqrt(N), u(boundary) / sqrt(2)] (loss = r.r)."""

        def r(v):
            return np.concatenate([self.residual(v) / np.sqrt(len(self.x)),
                                   self._u(v, BOUNDARY)[0].ravel() / np.sqrt(len(BOUNDARY))])

        J = central_jacobian(r, w)
        return 2.0 * J.T @ (J @ p)

    def _batches(self) -> str:
        sizes = [min(BATCH, len(self.x) - i) for i in range(0, len(self.x), BATCH)]
        return "+".join(str(s) for s in sizes)

    # ------------------------------------------------------------------ the layout of x
    def layout_problem(self, x0: np.ndarray) -> str | None:
        """None if x0 is the trainable weights in the interface's layout, else what it is instead."""
        x0 = np.asarray(x0, dtype=np.float64)
        n, frozen = self.start.size, self.everything.size - self.start.size
        if x0.shape == self.start.shape and np.allclose(x0, self.start, rtol=0, atol=1e-7):
            return None
        for layout, vector in self.with_frozen.items():
            if x0.shape == vector.shape and np.allclose(x0, vector, rtol=0, atol=1e-7):
                return (f"x0 has {x0.size} entries, {layout}, but the model has {n} trainable weights: the {frozen} "
                        "non-trainable weights (the frozen input scaling) are in x")
        if x0.size != n:
            return f"x0 has {x0.size} entries but the model has {n} trainable weights (and {frozen} non-trainable ones)"
        return "x0 is not the model's trainable weights in the interface's layout (model.trainable_variables in order)"

    @property
    def with_frozen(self) -> dict[str, np.ndarray]:
        frozen = self.everything[~self._trainable_mask]
        return {"all of the model's weights in model.weights' order (get_weights())": self.everything,
                "the trainable weights followed by the non-trainable ones": np.concatenate([self.start, frozen])}


def pinn_problem(keras) -> PinnProblem:
    """Needs floatx float64 (the suite's ``float64`` fixture): fit's adapters hand the points over in floatx."""
    model = poisson_model(keras)
    x = np.random.default_rng(29).uniform(0.0, 1.0, size=(POINTS, 1))
    slices, offset = {}, 0
    names = {id(model.hidden.kernel): "W1", id(model.hidden.bias): "b1", id(model.head.kernel): "W2",
             id(model.head.bias): "b2"}
    for v in model.trainable_variables:
        size = int(np.prod(v.shape))
        slices[names[id(v)]] = (slice(offset, offset + size), tuple(v.shape))
        offset += size
    start = np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in model.trainable_variables])
    everything = np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in model.weights])
    trainable = {id(v) for v in model.trainable_variables}
    mask = np.concatenate([np.full(int(np.prod(v.shape)), id(v) in trainable) for v in model.weights])
    return PinnProblem(model, x, np.zeros((POINTS, 1)), start, everything, slices, mask)


# ---------------------------------------------------------------------- the fit every PINN check starts from
def fitted_pinn(impl, observe, keras, method: str = "L-BFGS-B"):
    """fit the PINN problem (``maxiter=1``, batches of 16 in order); the problem and the scipy call it made. A
    refusal on purpose ends the check LIMIT, as a level the implementation does not offer does: a
    ValueError/TypeError/NotImplementedError raised by the implementation's own code before any scipy call (one
    raised inside Keras, TensorFlow, JAX or torch is a crash, and fails with its place)."""
    from .expect import fitted_call, reason
    from .levels import REFUSALS
    from .verdict import limit

    problem = pinn_problem(keras)
    before = len(observe.calls)
    try:
        _, call = fitted_call(impl, observe, problem.model, problem.x, problem.y, method=method, maxiter=1,
                              batch_size=BATCH, shuffle=False)  # batches in order: a per-batch loss can be named
    except AssertionError as failure:
        refusal = failure.__cause__
        if isinstance(refusal, REFUSALS) and len(observe.calls) == before and not _raised_by_a_library(refusal):
            limit(f"a model overriding compute_loss with input derivatives (a PINN) refused: "
                  f"{type(refusal).__name__}: {reason(refusal, limit=300)}")
        raise
    return problem, call


def _raised_by_a_library(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is a framework's or scipy's, not the implementation's."""
    from .expect import _frames, _library_frame

    frames = _frames(exc)
    return bool(frames) and _library_frame(frames[-1])
