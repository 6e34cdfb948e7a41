"""Keras's mean squared error as a sum of squared residuals, for least squares and Gauss-Newton.

With ``N`` samples, output ``o`` of ``d_o`` values per sample, loss weight ``w_o`` and sample
weight ``s_i``, Keras's compiled loss is::

    L(x) = sum_o w_o / (N d_o) * sum_i s_i * |y_pred_io(x) - y_io|^2  +  sum_v l2_v * |x_v|^2

so with residuals ``r_io = sqrt(w_o s_i / (N d_o)) (y_pred_io - y_io)`` and one extra row
``sqrt(l2_v) x_v`` per weight under an L2 regularizer, ``L = r . r`` exactly. Then:

- ``scipy.optimize.least_squares`` minimizes ``cost = r . r / 2 = L / 2``; its gradient
  ``J^T r`` is half the gradient of ``L``;
- the Gauss-Newton matrix of ``L`` is ``2 J^T J`` (the generalized Gauss-Newton matrix of the
  squared error), positive semi-definite, which :meth:`gauss_newton_hessp` multiplies by ``p``.

Residual layout: sample-major (sample ``i``'s values for every output, in the order of
``tf.nest.flatten(y)``), then the regularization rows. Rows are processed in blocks so that
memory stays bounded: ``chunk_size`` samples for residuals and Jacobian-vector products, and
blocks of ``sqrt(64 MiB / (8 n d))`` samples for the dense Jacobian (see :meth:`jacobian`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse.linalg
import tensorflow as tf

from ...base import checks
from ...base import keras_compat as _keras
from ...base.checks import NotSquaredErrorError
from ...base.objective import check_hessian_size
from .graphs import _dot
from .objective import TensorFlowObjective

__all__ = ["JacobianTooLargeError", "LeastSquaresObjective", "NotSquaredErrorError"]

JACOBIAN_BLOCK_BYTES = 64 * 2**20


class JacobianTooLargeError(ValueError):
    """The dense Jacobian would not fit the configured limit."""


class LeastSquaresObjective(TensorFlowObjective):
    """A :class:`TensorFlowObjective` whose loss is also available as residuals ``r(x)``.

    The setting ``max_jacobian_bytes`` bounds the dense Jacobian (:meth:`jacobian`).
    Refuses, before any optimization, a loss other than the mean squared error, regularizers
    other than L2 on weights, ``add_loss`` terms, masked outputs and negative sample weights;
    and checks that ``r . r`` equals Keras's loss at the starting point (the train function
    checks again at the end of a least-squares run).
    """

    def __init__(self, model: Any, x: Any, y: Any = None, sample_weight: Any = None, **settings: Any) -> None:
        super().__init__(model, x, y, sample_weight, **settings)
        self._loss_weights = _output_loss_weights(model, self.facts.output_names)
        self._l2 = _l2_coefficients(model, self.flat)
        self.nrev = self.njev = 0
        self.check_consistent(self.flat.read())

    # --------------------------------------------------------------- layout

    def _hold_data(self, dense: tuple[Any, Any, Any]) -> None:
        held = self._chunks
        super()._hold_data(dense)
        checks.check_residual_model(self.facts)
        _, data_y, sw = self.data
        if data_y is None:
            raise NotSquaredErrorError("least squares needs targets y (fit got none)")
        if sw is not None and any(float(tf.reduce_min(t)) < 0 for t in tf.nest.flatten(sw)):
            raise NotSquaredErrorError("negative sample weights cannot be written as squared residuals")
        self.values_per_sample = sum(
            int(np.prod(t.shape[1:], dtype=np.int64)) for t in tf.nest.flatten(data_y)
        )
        if self._chunks is not held:  # new data variables (new shapes): new graphs
            self._ls_functions = {}

    @property
    def num_residuals(self) -> int:
        """``m``: one per sample and output value, plus one per L2-regularized weight."""
        return self.num_samples * self.values_per_sample + int(np.count_nonzero(self._l2))

    def jacobian_bytes(self) -> int:
        return self.num_residuals * self.size * 8

    def check_jacobian_size(self) -> None:
        m, n = self.num_residuals, self.size
        if self.jacobian_bytes() > self.max_jacobian_bytes:
            raise JacobianTooLargeError(
                f"A dense Jacobian of {m} residuals x {n} weights needs {self.jacobian_bytes() / 2**30:.2f} GiB "
                f"(limit max_jacobian_bytes={self.max_jacobian_bytes}). Use method='trf' or 'dogbox' with "
                "jacobian='operator' (matrix-free, tr_solver='lsmr'), or raise max_jacobian_bytes."
            )

    def check_consistent(self, x: np.ndarray, when: str = "at the starting weights") -> float:
        """Refuse if ``r . r`` is not Keras's loss at ``x`` (a loss term the residuals miss); return
        Keras's loss there, computed afresh (the memo may hold ``r . r``)."""
        x = self.flat.as_vector(x)
        self._memo_x = None
        loss = self.value(x)  # first: a failing XLA compilation falls back here, before the residual graphs
        r = self.residuals(x)
        rr = float(r @ r)
        if not math.isclose(rr, loss, rel_tol=1e-4, abs_tol=1e-7 * max(1.0, abs(loss))):
            raise NotSquaredErrorError(
                f"Keras's loss ({loss:.8g}) is not the sum of squared residuals ({rr:.8g}) {when}: the model has a "
                "loss term this reference cannot write as residuals (a loss that only looks like the mean squared "
                "error, or a term outside the compiled loss). Least squares and Gauss-Newton need loss='mse' (per "
                "output, any loss_weights), sample weights >= 0, and only L2 weight regularizers."
            )
        return loss

    # ------------------------------------------------------------- numpy API
    def residuals(self, x: np.ndarray) -> np.ndarray:
        """``r(x)``, float64, shape ``(m,)``; also feeds the objective's memo (``f = r . r``)."""
        x = self.flat.as_vector(x)
        self.nrev += 1
        xt = self._device_vector(x)
        parts = [self._call("residuals", xt, start, size).numpy() for start, size in self._blocks(self.chunk_size)]
        l2 = self._l2 > 0
        r = np.concatenate(parts + [np.sqrt(self._l2[l2]) * x[l2]])
        f = float(r @ r)
        if not (self._memo_hit(x) and self._memo_g is not None):
            self._remember(x, f, None)
        return r

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        """Dense ``J = dr/dx``, float64, shape ``(m, n)``; refused above ``max_jacobian_bytes``."""
        self.check_jacobian_size()
        x = self.flat.as_vector(x)
        self.njev += 1
        xt = self._device_vector(x)
        # tape.jacobian vectorizes the backward pass over the block's residuals, and each of them
        # carries gradients for every row of the block: memory grows with rows^2 (5000 x 2689 in
        # one block took 8.7 GB). Blocks of sqrt(budget / (8 n d)) rows keep it near the budget.
        rows = max(1, math.isqrt(JACOBIAN_BLOCK_BYTES // max(1, 8 * self.size * self.values_per_sample)))
        blocks = [self._call("jacobian", xt, start, size).numpy() for start, size in self._blocks(rows)]
        return np.concatenate(blocks + [self._l2_jacobian()])

    def jacobian_operator(self, x: np.ndarray) -> scipy.sparse.linalg.LinearOperator:
        """``J`` at ``x`` as a matrix-free operator: ``J @ p`` and ``J.T @ u`` by autodiff."""
        x = self.flat.as_vector(x).copy()
        self.njev += 1
        m, n = self.num_residuals, self.size
        split = self.num_samples * self.values_per_sample
        l2 = self._l2 > 0
        root = np.sqrt(self._l2[l2])

        def matvec(p):
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            xt, pt = self._device_vector(x), self._device_vector(p)
            parts = [self._call("jvp", xt, pt, start, size).numpy() for start, size in self._blocks(self.chunk_size)]
            return np.concatenate(parts + [root * p[l2]])

        def rmatvec(u):
            u = np.asarray(u, dtype=np.float64).reshape(-1)
            xt = self._device_vector(x)
            out = np.zeros(n)
            d = self.values_per_sample
            for start, size in self._blocks(self.chunk_size):
                ut = tf.constant(u[start * d : (start + size) * d])
                out += self._call("vjp", xt, ut, start, size).numpy()
            out[l2] += root * u[split:]
            return out

        return scipy.sparse.linalg.LinearOperator((m, n), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)

    def gauss_newton_hessp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        """``2 J^T J p``: the Gauss-Newton approximation of ``H(x) @ p`` for ``L = r . r``."""
        x, p = self.flat.as_vector(x), self.flat.as_vector(p)
        self.nhvp += 1
        xt, pt = self._device_vector(x), self._device_vector(p)
        out = sum(self._call("gn_hvp", xt, pt, start, size).numpy() for start, size in self._blocks(self.chunk_size))
        return 2.0 * (out + self._l2 * p)

    def gauss_newton_hessian(self, x: np.ndarray) -> np.ndarray:
        """Dense ``2 J^T J`` (positive semi-definite); refused above ``max_hessian_params``."""
        check_hessian_size(self.size, self.max_hessian_params)
        self.nhess += 1
        J = self.jacobian(x)
        return 2.0 * (J.T @ J)

    # ---------------------------------------------------------------- graphs
    def _blocks(self, rows: int) -> list[tuple[int, int]]:
        n = self.num_samples
        return [(start, min(rows, n - start)) for start in range(0, n, rows)]

    def _call(self, name: str, *args: Any) -> tf.Tensor:
        # One function per (kind, block size); the block's start is a tensor, so a new
        # start does not retrace. XLA is used when the objective's graphs use it.
        *tensors, start, size = args
        key = (name, size)
        fn = self._ls_functions.get(key)
        if fn is None:
            graph = {"residuals": self._graph_residuals, "jacobian": self._graph_jacobian, "jvp": self._graph_jvp,
                     "vjp": self._graph_vjp, "gn_hvp": self._graph_gn_hvp}[name]
            xla = self.jit_compile and name != "jacobian"  # pfor's vectorized loops: left to TensorFlow
            fn = tf.function(lambda *a, g=graph, s=size: g(*a, s), jit_compile=xla)
            self._ls_functions[key] = fn
        self._held = None
        out = fn(*tensors, tf.constant(start, tf.int32))
        self._held = tensors[0]  # every block's graph assigns its x, as the objective's graphs do (_run)
        return out

    def _block_residuals(self, start: tf.Tensor, size: int) -> tf.Tensor:
        x, y, sw = self._rows(start, size)
        names = self.facts.output_names
        preds, targets = _per_output(self.model(x, training=False), names), _per_output(y, names)
        weights = _per_output(sw, names) if sw is not None else [None]
        columns = []
        for k, (pred, target) in enumerate(zip(preds, targets, strict=True)):
            # Per sample, flattened: a target of shape (N,) meets a prediction of shape (N, 1) as Keras does.
            err = tf.reshape(tf.cast(pred, tf.float64), [size, -1])
            err -= tf.reshape(tf.cast(target, tf.float64), [size, -1])
            scale = tf.constant(self._loss_weights[k] / (self.num_samples * int(err.shape[1])), tf.float64)
            w = weights[k] if len(weights) == len(preds) else weights[0]
            if w is not None:
                scale = scale * tf.reshape(tf.cast(w, tf.float64), [size, 1])
            columns.append(tf.sqrt(scale) * err)
        return tf.reshape(tf.concat(columns, axis=1), [-1])

    def _graph_residuals(self, x, start, size):
        self._assign(x)
        return self._block_residuals(start, size)

    def _graph_jacobian(self, x, start, size):
        self._assign(x)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._tf_vars)
            r = self._block_residuals(start, size)
        parts = tape.jacobian(r, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                              experimental_use_pfor=True)
        rows = int(r.shape[0])
        return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(j), tf.float64), [rows, -1]) for j in parts], 1)

    def _vjp(self, start, size, u):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._tf_vars)
            r = self._block_residuals(start, size)
            s = tf.reduce_sum(r * tf.cast(u, tf.float64))
        return tape.gradient(s, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _jvp(self, start, size, p):
        # J p by reverse over reverse: d/du <J^T u, p> at u = 0. Forward mode would do, but
        # recompiles under XLA through Embedding layers (see objective.HVP_MODES).
        u = tf.zeros([size * self.values_per_sample], tf.float64)
        with tf.GradientTape() as outer:
            outer.watch(u)
            inner = _dot(self._vjp(start, size, u), self.flat.split(p))
        return outer.gradient(inner, u)

    def _graph_jvp(self, x, p, start, size):
        self._assign(x)
        return self._jvp(start, size, p)

    def _graph_vjp(self, x, u, start, size):
        self._assign(x)
        return self.flat.concat(self._vjp(start, size, u))

    def _graph_gn_hvp(self, x, p, start, size):
        self._assign(x)
        jp = tf.stop_gradient(self._jvp(start, size, p))
        return self.flat.concat(self._vjp(start, size, jp))

    def _l2_jacobian(self) -> np.ndarray:
        l2 = np.nonzero(self._l2 > 0)[0]
        block = np.zeros((l2.size, self.size))
        block[np.arange(l2.size), l2] = np.sqrt(self._l2[l2])
        return block


def _per_output(structure: Any, names: list[str]) -> list[Any]:
    """Leaves of predictions, targets or sample weights in the order of the model's outputs: a dict
    is read by output name (``tf.nest.flatten`` would sort its keys), anything else flattened."""
    if isinstance(structure, Mapping) and set(names) <= set(structure):
        return [structure[name] for name in names]
    return tf.nest.flatten(structure)


def _output_loss_weights(model: Any, names: list[str]) -> list[float]:
    """Per-output loss weights (in the order of ``names``), after checking that every output's loss
    is the MSE. Dicts of losses or loss weights are read by output name, lists by position."""
    loss = model.loss
    if isinstance(loss, Mapping):
        losses = [loss.get(name) for name in names]
    elif isinstance(loss, Sequence) and not isinstance(loss, str):
        losses = list(loss)
    else:
        losses = [loss] * len(names)
    bad = [repr(x) for x in losses if not _keras.is_mean_squared_error(x)]
    if bad or len(losses) != len(names):
        raise NotSquaredErrorError(
            f"Least squares and Gauss-Newton need the mean squared error on every output (outputs {names}); the "
            f"model was compiled with loss={loss!r}. Compile with loss='mse', or use a minimize method (L-BFGS-B, "
            "trust-ncg, ...) with the exact Hessian."
        )
    config = model.get_compile_config() or {}
    weights = config.get("loss_weights")
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, Mapping):
        return [float(weights.get(name, 1.0)) for name in names]
    return [float(w) for w in (weights if isinstance(weights, Sequence) else [weights] * len(names))]


def _l2_coefficients(model: Any, flat: Any) -> np.ndarray:
    """Per flat weight, the L2 coefficient of its regularizer (0 if none); refuses others."""
    regularizers, activity = _keras.variable_regularizers(model)
    if activity:
        raise NotSquaredErrorError(
            f"Layers {activity} have activity regularizers, which least squares cannot write as residuals."
        )
    out = np.zeros(flat.size)
    for i, variable in enumerate(flat.variables):
        reg = regularizers.get(id(variable))
        if reg is None:
            continue
        l1 = float(getattr(reg, "l1", 0.0) or 0.0)
        l2 = getattr(reg, "l2", None)
        if l1 or l2 is None:
            raise NotSquaredErrorError(
                f"Weight {flat.names[i]} has regularizer {type(reg).__name__}; least squares takes only L2 "
                "(a squared norm, which becomes extra residual rows)."
            )
        out[flat.slice(i)] = float(l2)
    return out
