"""The full-batch objective: Keras's loss over the whole data set, with exact derivatives.

``f(x)`` is ``model.compute_loss`` (compiled loss + regularization and ``add_loss`` terms)
over all samples at once, in inference mode, with the trainable variables set to the flat
float64 vector ``x`` -- the value ``model.evaluate(x, y, batch_size=len(x))`` reports.

Data larger than ``chunk_size`` rows is evaluated in fixed-size chunks inside one compiled
graph (a sequential ``tf.while_loop``), so memory is bounded by the chunk. Each chunk's
loss is weighted by its share of the denominator of Keras's reduction (``base.checks.chunk_rule``):
its share of the rows for ``sum_over_batch_size``, 1 for ``sum``, its share of the sample
weights for ``mean_with_sample_weight``; weight regularizers are counted once. A loss no rule
reproduces exactly (masked outputs, ``add_loss`` terms, a custom loss that may reduce over the
batch itself, an overridden ``compute_loss``) is evaluated in one chunk, with a warning.

Before any compiled work, every chunk is run once through the model and ``compute_loss`` in a
plain ``tf.function`` (no XLA, which would clamp an out-of-range Embedding id instead of
raising), as ``fit`` and ``evaluate`` run models: in graph mode.

Every callable sets the variables from its own ``x`` first, so calls may come in any
order. Values and gradients are memoized on a copy of the last ``x``.

Speed: the data lives in non-trainable ``tf.Variable`` s read inside the graphs, so a call
passes one vector in and gets one vector out; a new epoch's data of the same shapes is
assigned, not retraced. The graphs are XLA-compiled by default, with a fallback to plain
TensorFlow (and a warning) if XLA cannot compile the model.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from ...base import checks
from ...base.objective import Objective
from .data import to_tensor
from .flat import GraphFlatVariables, tf_variable
from .graphs import ChunkGraphs, _map_data

__all__ = ["FullBatchObjective", "PEER_ERRORS", "TensorFlowObjective"]

# What a collective raises when another worker of a tf.distribute run is gone: not XLA's fault.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError)


class TensorFlowObjective(ChunkGraphs, Objective):
    """Keras's full-batch loss as a function of one float64 weight vector, on TensorFlow (Keras 3's
    TensorFlow backend, or tf-keras). Parameters as :class:`~keras_opt_ref.base.objective.Objective`;
    here:

    jit_compile
        XLA-compile value, gradient and HVP. ``None`` (default): XLA, falling back to plain
        TensorFlow with a warning if XLA fails on the model; ``True``: XLA, errors raised;
        ``False``: no XLA. (Keras 3 turns its own ``"auto"`` off on CPU-only machines; for
        full-batch evaluation XLA is 1.3-6x faster on CPU, see ``benchmarks/``.)
    hvp_mode
        ``"reverse-over-reverse"`` (``None``, the default) or ``"forward-over-reverse"``.
        Measured here, reverse-over-reverse is as fast or faster (1.5-1.8x a gradient);
        forward-over-reverse through Embedding recompiles under XLA at every new ``(x, p)``
        (150x slower) and fails on tf-keras's Embedding ("Duplicate node name").
    max_data_bytes
        Sparse inputs count densified.
    """

    backend = "tensorflow"
    flat_class = GraphFlatVariables
    _held: tf.Tensor | None = None  # the x the last compiled evaluation assigned to the variables
    _chunks: tuple[Any, Any] | None = None

    _convert_leaf = staticmethod(to_tensor)

    def _setup(self) -> None:
        self._xla_fallback = self.settings.jit_compile is None
        self._tf_vars = [tf_variable(v) for v in self.flat.variables]
        self.traces: dict[str, int] = {"value": 0, "value_and_grad": 0, "hvp": 0, "hessian": 0, "steihaug": 0}
        self._build_functions()

    def _build_functions(self) -> None:
        self._functions = {
            "value": tf.function(self._graph_value, jit_compile=self.jit_compile),
            "value_and_grad": tf.function(self._graph_value_and_grad, jit_compile=self.jit_compile),
            "hvp": tf.function(self._graph_hvp, jit_compile=self.jit_compile),
            "hessian": tf.function(self._graph_hessian),  # a long sequential loop: XLA buys nothing
            "steihaug": tf.function(self._graph_steihaug, jit_compile=self.jit_compile),
        }
        self._concrete: dict[str, Any] = {}

    def _concrete_function(self, name: str) -> Any:
        # Calling the concrete function skips tf.function's argument binding and trace-cache
        # lookup: about 0.15 ms per call, 10% of a medium-sized evaluation (benchmarks/).
        fn = self._concrete.get(name)
        if fn is None:
            spec = tf.TensorSpec([self.flat.size], self.flat.common_dtype)
            if name == "steihaug":  # x, then scipy's f, g and trust radius in float64
                scalar = tf.TensorSpec([], tf.float64)
                specs = (spec, scalar, tf.TensorSpec([self.flat.size], tf.float64), scalar)
            else:
                specs = [spec] * (2 if name == "hvp" else 1)
            fn = self._functions[name].get_concrete_function(*specs)
            self._concrete[name] = fn
        return fn

    # ------------------------------------------------------------------ data
    def _hold(self, data: tuple[Any, Any, Any], rows: int) -> None:
        """Cut the data into chunk variables (head: whole chunks, tail: the rest) and their shares."""
        n = self.num_samples
        self._chunk_rows = c = rows
        full, rest = divmod(n, c) if n > c else (0, n)
        # head: (full, c, ...) chunks walked by a while_loop; tail: the remaining rows.
        head = _map_data(lambda t: tf.reshape(t[: full * c], [full, c, *t.shape[1:]]), data) if full else None
        tail = _map_data(lambda t: t[full * c :], data)
        # Each chunk's share of the loss (rule "sample_weight": computed in the graph from the data).
        self._weights = (1.0, 1.0 if rest else 0.0) if self.rule == "sum" else (c / n, rest / n)
        if self._chunks is not None and _same_layout(self._chunks, (head, tail)):
            tf.nest.map_structure(lambda v, t: None if v is None else v.assign(t), self._chunks, (head, tail))
        else:
            self._chunks = _map_data(lambda t: tf.Variable(t, trainable=False), (head, tail))
            if hasattr(self, "_functions"):
                self._build_functions()  # new shapes: new graphs

    @property
    def data(self) -> tuple[Any, Any, Any]:
        """The training set ``(x, y, sample_weight)`` as tensors, reassembled from the chunks."""
        head, tail = self._chunks

        def join(h, t):
            if t is None:
                return None
            t = tf.convert_to_tensor(t)
            return t if h is None else tf.concat([tf.reshape(h, [-1, *t.shape[1:]]), t], 0)

        return tail if head is None else tf.nest.map_structure(join, head, tail)

    def _backend_tensor(self, leaf: Any) -> Any:
        return tf.convert_to_tensor(leaf)

    def _loss_facts(self, data: tuple[Any, Any, Any]) -> checks.LossFacts:
        # The model and compute_loss once per chunk, in a plain tf.function: surfaces data errors
        # (shapes, dtypes, Embedding ids, which XLA would clamp) before any compiled work, builds
        # the model and Keras's loss container outside the compiled graphs, and records what the
        # trace shows about the loss (self.facts: masks, add_loss terms, the loss's shape).
        if not hasattr(self, "_check_function"):
            self.facts = checks.LossFacts()  # filled in while the check traces (once per chunk shape)
            self._check_function = tf.function(self._graph_check, jit_compile=False)
        n, c = self.num_samples, self.chunk_size
        try:
            for start in range(0, n, c):
                batch = _map_data(lambda t, s=start: t[s : s + c], data)
                # Called as a concrete function: tf.function's retracing detector keys on the method's
                # code, so calling it would count every objective's traces (one per chunk shape)
                # together and warn on the sixth model fitted in a process.
                self._check_function.get_concrete_function(batch)(batch)
        except (tf.errors.OpError, ValueError, TypeError) as exc:
            raise ValueError(
                f"The model cannot evaluate its training data ({checks.summary(exc)}). Check the inputs' "
                "shapes, dtypes and index ranges (e.g. Embedding ids < input_dim)."
            ) from exc
        return self.facts

    def _graph_check(self, batch: tuple[Any, Any, Any]) -> tf.Tensor:
        x, y, sample_weight = batch
        y_pred = self.model(x, training=False)
        checks.record(self.facts, self.model, y, y_pred)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        self.facts.loss_shape = tuple(tf.convert_to_tensor(loss).shape)
        return loss

    # ------------------------------------------------------ the backend's part (base.objective.Objective)
    def _compute_value(self, x: np.ndarray) -> float:
        return float(self._run("value", self._device_vector(x)))

    def _value_and_grad_call(self, w: tf.Tensor) -> tf.Tensor:
        return self._run("value_and_grad", w)  # eager TensorFlow on the CPU: returns when computed

    def _to_host(self, out: tf.Tensor) -> np.ndarray:
        return out.numpy()

    def _compute_hvp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        return self._run("hvp", self._device_vector(x), self._device_vector(p)).numpy()

    def _compute_hessian(self, x: np.ndarray) -> np.ndarray:
        return self._run("hessian", self._device_vector(x)).numpy()

    def steihaug(self, x: np.ndarray, f: float, g: np.ndarray, trust_radius: float) -> tuple:
        """scipy's trust-ncg subproblem solved in one compiled call: ``(p, hits_boundary, Hp, count)``.

        The same steps and stopping rules as ``scipy.optimize``'s ``CGSteihaugSubproblem.solve``
        (Nocedal & Wright, algorithm 7.2) from scipy's own ``f`` and ``g`` at ``x``, in float64,
        then ``Hp = H(x) p`` for scipy's model value ``m(p)``: ``count`` HVPs in all, as many as
        scipy would ask for. ``count`` is negative if an HVP was not finite (the run must stop).
        With the data in one chunk, the HVPs reuse one linearization of the gradient at ``x``.
        """
        x = self.flat.as_vector(x)
        scalar = lambda v: tf.constant(float(v), tf.float64)  # noqa: E731
        g = tf.constant(np.asarray(g, dtype=np.float64))
        p, hits, hp, count = self._run("steihaug", self._device_vector(x), scalar(f), g, scalar(trust_radius))
        count = int(count)
        self.nhvp += abs(count)
        return p.numpy(), bool(hits), hp.numpy(), count

    def _device_vector(self, x: np.ndarray) -> tf.Tensor:
        return tf.convert_to_tensor(x.astype(self.flat.common_dtype, copy=False))

    def weights_hold(self, x: np.ndarray) -> bool:
        # Every compiled evaluation assigns its x (its first argument) to the variables: they hold the
        # last one's, unless something wrote them since (weights_touched).
        held = self._held
        return held is not None and np.array_equal(held.numpy(), np.asarray(x).astype(self.flat.common_dtype))

    def weights_touched(self) -> None:
        self._held = None

    def set_weights(self, x: np.ndarray) -> None:
        super().set_weights(x)
        self._held = None  # not recorded: the write rounds each variable on its own, the graphs x as a whole

    def _run(self, name: str, *args: tf.Tensor) -> tf.Tensor:
        """Call compiled function ``name``; on an XLA failure fall back to plain TensorFlow."""
        self._held = None
        out = self._run_compiled(name, *args)
        self._held = args[0] if name in _ASSIGNING else None  # a tensor: read only when asked
        return out

    def _run_compiled(self, name: str, *args: tf.Tensor) -> tf.Tensor:
        try:
            return self._concrete_function(name)(*args)
        except tf.errors.OpError as exc:
            if not (self._xla_fallback and self.jit_compile and name != "hessian") or isinstance(exc, PEER_ERRORS):
                raise
            self.jit_compile = False
            self._build_functions()
            result = self._concrete_function(name)(*args)  # a real error (not XLA's) raises again here
            warnings.warn(
                f"XLA could not compile this model ({checks.summary(exc)}); evaluating without XLA, which may "
                "be slower. Pass jit_compile=False to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return result


FullBatchObjective = TensorFlowObjective  # its name in 0.1.0
_ASSIGNING = frozenset({"value", "value_and_grad", "hvp", "hessian", "steihaug"})  # graphs that assign x


def _same_layout(held: Any, new: Any) -> bool:
    """Whether ``new`` tensors fit the ``held`` variables (same structure, shapes, dtypes)."""
    try:
        tf.nest.assert_same_structure(held, new)
    except (ValueError, TypeError):
        return False
    pairs = zip(tf.nest.flatten(held), tf.nest.flatten(new), strict=True)
    return all(
        (v is None and t is None) or (v is not None and t is not None and v.shape == t.shape and v.dtype == t.dtype)
        for v, t in pairs
    )
