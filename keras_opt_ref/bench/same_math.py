"""The workloads' losses written by hand on one flat vector: the floor the reference is measured against.

For the ``linear``, ``mlp`` and ``factorization`` workloads, :func:`same_math` returns the same
function the Keras model computes -- the same weights in the same layout (``FlatVariables`` of
``model.trainable_variables``: each variable flattened in C order, concatenated in order), the
model's compute dtype, mean squared error over all samples -- written directly as one function of
one flat vector, with no model, no variables and no Keras in the loop:

- ``"tensorflow"``: one ``tf.function(jit_compile=True)`` per quantity; the gradient by a
  ``GradientTape`` on the flat vector, the Hessian-vector product by reverse-over-reverse (a
  second tape over the first). Forward-over-reverse (a ``ForwardAccumulator`` around the tape,
  ``hvp_mode="forward-over-reverse"``) is as fast on mlp-medium (2.9 ms each), but on the
  factorization TensorFlow's JVP through the gather's gradient makes XLA take the inputs as
  compile-time constants: it recompiles at every new ``(x, p)`` (3.4 s a call on
  factorization-medium) and, at points already seen, returns a folded constant (0.85 ms, a
  timing that means nothing). :func:`~keras_opt_ref.bench.same_math_costs` checks for this.
- ``"jax"`` (optional, ``pip install keras-opt-ref[jax]``): ``jax.jit(jax.value_and_grad(loss))``,
  the HVP as ``jax.jvp`` of ``jax.grad`` (forward-over-reverse, JAX's recommended form).
- ``"torch"`` (optional): eager autograd, the HVP as a double backward (as the reference's torch
  objective computes, which measured ``torch.compile`` not to pay).

All take and return float64 NumPy, as the reference's objectives do: ``x`` is rounded to the compute
dtype on the host, and the loss and gradient come back as one float64 vector, in three steps that
``bench.boundary`` times one by one (:meth:`SameMath.device_vector`, :meth:`SameMath.call`,
:meth:`SameMath.to_host`). The math itself is written once, against a few array operations
(:class:`Ops`) that each backend supplies.

Two forms (``form=``): ``"elementwise"``, the fastest way we know to write it (the factorization's
prediction as a sum of products over each row), and ``"keras"``, the same math as Keras's layers
compute it (``keras.layers.Dot`` takes each row's dot product as a batched ``(1 x k) @ (k x 1)``
matrix product, which XLA's CPU backend runs 1.47x slower than the elementwise form on
factorization-medium, docs/measurements.md). For the dense workloads both forms are one.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base.flat import FlatVariables
from .workloads import Workload

__all__ = ["BACKENDS", "FORMS", "TF_HVP_MODES", "Ops", "SameMath", "backend_skip_reason", "same_math",
           "workload_math"]

BACKENDS = ("tensorflow", "jax", "torch")
FORMS = ("elementwise", "keras")
TF_HVP_MODES = ("reverse-over-reverse", "forward-over-reverse")  # the first is the default


def backend_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here (its package is missing), or None."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKENDS}")
    try:
        importlib.import_module(backend)
    except ImportError as exc:
        return f"{backend} is not installed (pip install keras-opt-ref[{backend}]): {exc}"
    return None


@dataclass(frozen=True)
class Ops:
    """The array operations the losses need, from one array library."""

    tanh: Callable[[Any], Any]
    take_rows: Callable[[Any, Any], Any]  # table[ids] along axis 0
    sum_rows: Callable[[Any], Any]  # sum over axis 1
    mean: Callable[[Any], Any]
    matmul: Callable[[Any, Any], Any] = None  # batched over the leading axis (form "keras")


def dense_stack_loss(ops: Ops, params: Sequence[Any], data: Sequence[Any]) -> Any:
    """``Dense`` layers (kernel, bias pairs), tanh between them, linear output; mean squared error.

    One layer is the ``linear`` workload, three the ``mlp``. ``data`` is ``(X, y)``, y of shape (N, 1).
    """
    X, y = data
    layers = list(zip(params[0::2], params[1::2], strict=True))
    h = X
    for k, (kernel, bias) in enumerate(layers):
        h = h @ kernel + bias
        if k < len(layers) - 1:
            h = ops.tanh(h)
    r = h - y
    return ops.mean(r * r)


def factorization_loss(ops: Ops, params: Sequence[Any], data: Sequence[Any], form: str = "elementwise") -> Any:
    """``U[u] . V[i] (+ bu[u] + bi[i])`` against the ratings; mean squared error.

    ``params`` is ``(U, V)`` or ``(U, V, bu, bi)``; ``data`` is ``(users, items, ratings)``, each (N,).
    ``form="keras"`` takes the dot products as ``keras.layers.Dot`` does: a batched matrix product.
    """
    users, items, ratings = data
    U, V = params[0], params[1]
    u, v = ops.take_rows(U, users), ops.take_rows(V, items)
    pred = ops.matmul(u[:, None, :], v[:, :, None])[:, 0, 0] if form == "keras" else ops.sum_rows(u * v)
    if len(params) == 4:
        pred = pred + ops.sum_rows(ops.take_rows(params[2], users) + ops.take_rows(params[3], items))
    r = pred - ratings
    return ops.mean(r * r)


def workload_math(workload: Workload, flat: FlatVariables,
                  form: str = "elementwise") -> tuple[Callable[..., Any], list[int], list[np.ndarray]]:
    """The loss function ``(ops, params, data)`` of ``workload`` in ``form`` (one of :data:`FORMS`), the order
    in which it takes the flat layout's parts, and its data.

    The factorization's tables are found in the layout by shape (so users and items must differ in
    number): factors ``(users, k)``, ``(items, k)``, then the biases ``(users, 1)``, ``(items, 1)``.
    """
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r}; choose one of {FORMS}")
    if workload.name in ("linear", "mlp"):
        x = np.asarray(workload.x)
        return dense_stack_loss, list(range(len(flat))), [x, np.asarray(workload.y).reshape(len(x), -1)]
    if workload.name == "factorization":
        data = workload.factorization
        if data.n_users == data.n_items:
            raise ValueError("the factorization's tables are found by shape: use n_users != n_items")
        where = {(shape[0], shape[1] == 1): k for k, shape in enumerate(flat.shapes)}
        order = [where[(data.n_users, False)], where[(data.n_items, False)]]
        if len(flat) == 4:
            order += [where[(data.n_users, True)], where[(data.n_items, True)]]
        ids = [data.users.reshape(-1), data.items.reshape(-1), data.ratings.reshape(-1)]
        return (lambda ops, params, data: factorization_loss(ops, params, data, form)), order, ids
    raise ValueError(f"no same-math loss for {workload.name!r}; there is one for linear, mlp and factorization")


class SameMath:
    """One workload's loss, gradient and Hessian-vector product as compiled functions of a flat vector.

    Built by :func:`same_math`. ``x`` and ``p`` are float64 vectors of :attr:`size` weights in the
    model's layout; values come back as float64 (computed in :attr:`dtype`).
    """

    backend: str
    hvp_mode: str
    dtype: np.dtype
    size: int

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        out = self.to_host(self.call(self.device_vector(x)))
        return float(out[0]), out[1:]

    def value(self, x: np.ndarray) -> float:
        return self.value_and_grad(x)[0]

    def hessp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        return self._hvp(x, p)

    def device_vector(self, x: np.ndarray) -> Any:
        """``x`` (float64 NumPy) in the compute dtype, where the backend computes."""
        raise NotImplementedError

    def call(self, v: Any) -> Any:
        """``[f, g...]`` by the compiled function, computed (ready) when it returns."""
        raise NotImplementedError

    def to_host(self, out: Any) -> np.ndarray:
        """``out`` as float64 NumPy."""
        raise NotImplementedError

    def _hvp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _splitter(flat: FlatVariables, order: Sequence[int], reshape: Callable[[Any, tuple], Any]) -> Callable:
    """A flat vector -> its parts in ``order``, each reshaped like its variable (static slices)."""
    spans = [(flat.offsets[k], flat.offsets[k + 1], flat.shapes[k]) for k in order]
    return lambda v: [reshape(v[a:b], shape) for a, b, shape in spans]


def tf_ops() -> Ops:
    import tensorflow as tf

    return Ops(tanh=tf.tanh, take_rows=tf.gather, sum_rows=lambda t: tf.reduce_sum(t, axis=1), mean=tf.reduce_mean,
               matmul=tf.matmul)


class TensorFlowSameMath(SameMath):
    """:attr:`loss` is the loss as a graph-side function of a flat tensor of :attr:`dtype`, for
    solvers that run in the graph (:mod:`.alternatives`)."""

    backend = "tensorflow"

    def __init__(self, loss, flat: FlatVariables, order, data, dtype, hvp_mode: str = "reverse-over-reverse") -> None:
        import tensorflow as tf

        self._tf = tf
        if hvp_mode not in TF_HVP_MODES:
            raise ValueError(f"Unknown hvp_mode {hvp_mode!r}; choose one of {TF_HVP_MODES}")
        self.dtype, self.size, self.hvp_mode = np.dtype(dtype), flat.size, hvp_mode
        split = _splitter(flat, order, tf.reshape)
        # In variables, as the reference holds its data: XLA takes captured eager tensors as constants
        # and folds them (it presorts the factorization's scatter indices), which no user's data allows.
        data = [tf.Variable(d.astype(self.dtype) if d.dtype.kind == "f" else d, trainable=False) for d in data]

        ops = tf_ops()

        def f(v):
            return loss(ops, split(v), data)

        self.loss = f

        def grad(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                value = f(v)
            return value, tape.gradient(value, v)

        def value_and_grad(v):
            value, g = grad(v)
            return tf.concat([tf.reshape(tf.cast(value, tf.float64), [1]), tf.cast(g, tf.float64)], 0)

        def hvp(v, p):
            if hvp_mode == "forward-over-reverse":
                with tf.autodiff.ForwardAccumulator(v, p) as acc:
                    _, g = grad(v)
                return tf.cast(acc.jvp(g), tf.float64)
            with tf.GradientTape() as outer:
                outer.watch(v)
                _, g = grad(v)
                g_dot_p = tf.reduce_sum(g * p)
            return tf.cast(outer.gradient(g_dot_p, v), tf.float64)

        # Concrete functions: no argument binding or trace-cache lookup per call, as in the reference.
        spec = tf.TensorSpec([self.size], self.dtype)
        self._vg_fn = tf.function(value_and_grad, jit_compile=True).get_concrete_function(spec)
        self._hvp_fn = tf.function(hvp, jit_compile=True).get_concrete_function(spec, spec)

    def device_vector(self, x: np.ndarray) -> Any:
        return self._tf.convert_to_tensor(np.asarray(x, dtype=np.float64).astype(self.dtype, copy=False))

    def call(self, v: Any) -> Any:
        return self._vg_fn(v)  # eager TensorFlow on the CPU: returns when computed

    def to_host(self, out: Any) -> np.ndarray:
        return out.numpy()

    def _hvp(self, x, p):
        return self._hvp_fn(self.device_vector(x), self.device_vector(p)).numpy()


class JaxSameMath(SameMath):
    """:attr:`loss` ``(v, data)`` is the loss as a JAX function of a flat array of :attr:`dtype`
    and of :attr:`data`, for solvers written in JAX (:mod:`.alternatives`)."""

    backend = "jax"
    hvp_mode = "forward-over-reverse"

    def __init__(self, loss, flat: FlatVariables, order, data, dtype) -> None:
        import jax
        import jax.numpy as jnp

        self.dtype, self.size = np.dtype(dtype), flat.size
        self._jax = jax
        # A float64 model needs JAX's 64-bit mode; it is switched on for this object's calls only.
        self._x64 = self.dtype == np.float64
        ops = Ops(tanh=jnp.tanh, take_rows=lambda t, i: jnp.take(t, i, axis=0),
                  sum_rows=lambda t: jnp.sum(t, axis=1), mean=jnp.mean, matmul=jnp.matmul)
        split = _splitter(flat, order, jnp.reshape)

        def f(v, data):
            return loss(ops, split(v), data)

        self.loss = f

        def value_and_grad(v, data):
            value, g = jax.value_and_grad(f)(v, data)
            return jnp.concatenate([jnp.reshape(value, [1]), g])

        def hvp(v, p, data):
            return jax.jvp(lambda u: jax.grad(f)(u, data), (v,), (p,))[1]

        with jax.enable_x64(self._x64):
            # The data are arguments, not constants baked into the compiled program.
            self.data = [jax.device_put(d.astype(self.dtype) if d.dtype.kind == "f" else d) for d in data]
            self._vg_fn, self._hvp_fn = jax.jit(value_and_grad), jax.jit(hvp)

    def _mode(self) -> Any:
        """JAX's 64-bit mode as this object needs it (a context switch only where the process differs)."""
        return contextlib.nullcontext() if self._jax.config.jax_enable_x64 == self._x64 else \
            self._jax.enable_x64(self._x64)

    def device_vector(self, x: np.ndarray) -> Any:  # NumPy: jit's dispatch moves it to the device, fastest
        return np.asarray(x, dtype=np.float64).astype(self.dtype, copy=False)

    def call(self, v: Any) -> Any:
        with self._mode():
            return self._vg_fn(v, self.data).block_until_ready()

    def to_host(self, out: Any) -> np.ndarray:
        return np.asarray(out, dtype=np.float64)

    def _hvp(self, x, p):
        with self._mode():
            return np.asarray(self._hvp_fn(self.device_vector(x), self.device_vector(p), self.data), dtype=np.float64)


class TorchSameMath(SameMath):
    """:attr:`loss` ``(v)`` is the loss as a torch function of a flat tensor of :attr:`dtype`; eager autograd."""

    backend = "torch"
    hvp_mode = "reverse-over-reverse"

    def __init__(self, loss, flat: FlatVariables, order, data, dtype) -> None:
        import torch

        self.dtype, self.size, self._torch = np.dtype(dtype), flat.size, torch
        ops = Ops(tanh=torch.tanh, take_rows=lambda t, i: torch.index_select(t, 0, i),
                  sum_rows=lambda t: torch.sum(t, dim=1), mean=torch.mean, matmul=torch.matmul)
        split = _splitter(flat, order, torch.reshape)
        data = [torch.from_numpy(d.astype(self.dtype) if d.dtype.kind == "f" else d.astype(np.int64)) for d in data]
        self.loss = lambda v: loss(ops, split(v), data)

    def device_vector(self, x: np.ndarray) -> Any:
        v = self._torch.from_numpy(np.asarray(x, dtype=np.float64).astype(self.dtype))
        return v.requires_grad_(True)

    def call(self, v: Any) -> Any:
        f = self.loss(v)
        (g,) = self._torch.autograd.grad(f, v)
        return self._torch.cat([f.detach().reshape(1), g]).double()

    def to_host(self, out: Any) -> np.ndarray:
        return out.numpy()

    def _hvp(self, x, p):
        v = self.device_vector(x)
        (g,) = self._torch.autograd.grad(self.loss(v), v, create_graph=True)
        (hp,) = self._torch.autograd.grad(g, v, self._torch.from_numpy(np.asarray(p).astype(self.dtype)))
        return hp.double().numpy()


def same_math(workload: Workload, backend: str = "tensorflow", form: str = "elementwise", **options: Any) -> SameMath:
    """The hand-written flat-vector loss of ``workload`` on ``backend`` (one of :data:`BACKENDS`), in ``form``
    (one of :data:`FORMS`).

    The compute dtype is the model's (its variables' common dtype). ``options``: ``hvp_mode`` for
    ``"tensorflow"`` (one of :data:`TF_HVP_MODES`). Raises ``ImportError`` if the backend's
    package is missing (see :func:`backend_skip_reason`).
    """
    reason = backend_skip_reason(backend)
    if reason:
        raise ImportError(reason)
    flat = FlatVariables.from_variables(workload.model.trainable_variables)
    loss, order, data = workload_math(workload, flat, form)
    dtype = flat.common_dtype
    kind = {"tensorflow": TensorFlowSameMath, "jax": JaxSameMath, "torch": TorchSameMath}[backend]
    return kind(loss, flat, order, data, dtype, **options)
