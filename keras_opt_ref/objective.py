"""The full-batch objective: Keras's loss over the whole data set, with exact derivatives.

``f(x)`` is ``model.compute_loss`` (compiled loss + regularization and ``add_loss`` terms)
over all samples at once, in inference mode, with the trainable variables set to the flat
float64 vector ``x`` -- the value ``model.evaluate(x, y, batch_size=len(x))`` reports.

Data larger than ``chunk_size`` rows is evaluated in fixed-size chunks inside one compiled
graph (a sequential ``tf.while_loop``), so memory is bounded by the chunk. Each chunk's
loss is weighted by its share of the denominator of Keras's reduction (``checks.chunk_rule``):
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
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from . import _keras, checks, methods
from .core import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_HESSIAN_PARAMS,
    HessianTooLargeError,
    Objective,
    check_hessian_size,
)
from .flat import FlatVariables

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_DATA_BYTES",
    "DEFAULT_MAX_HESSIAN_PARAMS",
    "FullBatchObjective",
    "HessianTooLargeError",
    "check_hessian_size",
]

HVP_MODES = methods.HVP_MODES
# What a collective raises when another worker of a tf.distribute run is gone: not XLA's fault.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError)


class FullBatchObjective(Objective):
    """Keras's full-batch loss as a function of one float64 weight vector, on TensorFlow.

    Parameters
    ----------
    model
        A compiled Keras 3 (TensorFlow backend) or tf-keras model.
    x, y, sample_weight
        The whole training set, as accepted by ``model(x)`` and ``model.compute_loss``:
        arrays, tensors, or lists/dicts of them for multi-input/-output models.
    chunk_size
        Rows per chunk inside the graph; bounds memory for large data.
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
    max_hessian_params
        Largest number of weights for which :meth:`hessian` builds a dense matrix.
    deterministic
        Accept stochastic layers (Dropout, noise), evaluated in inference mode.
    max_data_bytes
        Largest training set, in bytes as dense tensors, held in memory (sparse inputs are
        densified); larger data is refused before any work.
    """

    backend = "tensorflow"

    def __init__(
        self,
        model: Any,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        jit_compile: bool | None = None,
        hvp_mode: str | None = None,
        max_hessian_params: int = DEFAULT_MAX_HESSIAN_PARAMS,
        deterministic: bool = False,
        max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    ) -> None:
        settings = methods.check_settings(
            chunk_size=chunk_size, jit_compile=jit_compile, hvp_mode=hvp_mode, max_hessian_params=max_hessian_params,
            deterministic=deterministic, max_data_bytes=max_data_bytes,
        )
        checks.check_model(model, deterministic=deterministic)
        self.model = model
        self.chunk_size = settings["chunk_size"]
        self.max_data_bytes = settings["max_data_bytes"]
        self.hvp_mode = settings["hvp_mode"]
        self.max_hessian_params = settings["max_hessian_params"]
        self.jit_compile = True if jit_compile is None else bool(jit_compile)
        self._xla_fallback = jit_compile is None
        self._chunks: tuple[Any, Any] | None = None
        self.facts = checks.LossFacts()
        self._check_function = tf.function(self._graph_check, jit_compile=False)
        self.set_data(x, y, sample_weight)
        checks.check_trainable(model)
        self.flat = FlatVariables.from_variables(model.trainable_variables)
        self._tf_vars = [_keras.tf_variable(v) for v in self.flat.variables]
        self.traces: dict[str, int] = {"value": 0, "value_and_grad": 0, "hvp": 0, "hessian": 0, "steihaug": 0}
        self._build_functions()
        self.reset_counters()

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
    def set_data(self, x: Any, y: Any = None, sample_weight: Any = None) -> None:
        """Hold a new training set in memory (validated; same shapes reuse the graphs)."""
        data, why = self._validated(x, y, sample_weight)
        self._hold(data, why)
        self.forget()

    def _validated(self, x: Any, y: Any, sample_weight: Any) -> tuple[tuple[Any, Any, Any], str]:
        """The training set as tensors, checked through the model; sets ``num_samples`` and ``rule``
        (``""`` with the reason when no chunk rule is exact)."""
        data = checks.as_tensors((x, y, sample_weight), self.max_data_bytes)
        self.num_samples = checks.check_data(data)
        self._check_on_data(data)
        self.rule, why = checks.chunk_rule(self.model, self.facts, data[2])
        return data, why

    def _hold(self, data: tuple[Any, Any, Any], why: str) -> None:
        """Cut the data into chunk variables (head: whole chunks, tail: the rest) and their shares."""
        n, rows = self.num_samples, self.chunk_size
        if n > rows and not self.rule:
            warnings.warn(
                f"All {n} samples are evaluated in one piece, not in chunks of chunk_size={rows}: {why}, so chunk "
                "values do not add up to Keras's loss. Memory is not bounded by chunk_size here.",
                UserWarning,
                stacklevel=4,
            )
            rows = n
        self.rule = self.rule or "rows"
        self._chunk_rows = c = min(rows, n)
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

    def _check_on_data(self, data: tuple[Any, Any, Any]) -> None:
        # The model and compute_loss once per chunk, in a plain tf.function: surfaces data errors
        # (shapes, dtypes, Embedding ids, which XLA would clamp) before any compiled work, builds
        # the model and Keras's loss container outside the compiled graphs, and records what the
        # trace shows about the loss (self.facts: masks, add_loss terms, the loss's shape).
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
        checks.check_loss_facts(self.facts)

    def _graph_check(self, batch: tuple[Any, Any, Any]) -> tf.Tensor:
        x, y, sample_weight = batch
        y_pred = self.model(x, training=False)
        outputs = tf.nest.flatten(y_pred)
        facts = self.facts
        facts.add_losses = max(facts.add_losses, _keras.add_loss_count(self.model))
        facts.masked = facts.masked or any(_keras.output_mask(t) is not None for t in outputs)
        names = list(getattr(self.model, "output_names", None) or [])
        facts.output_names = sorted(y_pred) if isinstance(y_pred, dict) else (
            names if len(names) == len(outputs) else [str(i) for i in range(len(outputs))])
        facts.batch_level = _batch_level_losses(self.model, y, outputs)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        facts.loss_shape = tuple(tf.convert_to_tensor(loss).shape)
        return loss

    # ------------------------------------------------------ the backend's part (core.Objective)
    def _compute_value(self, x: np.ndarray) -> float:
        return float(self._run("value", self._tensor(x)))

    def _compute_value_and_grad(self, x: np.ndarray) -> np.ndarray:
        return self._run("value_and_grad", self._tensor(x)).numpy()

    def _compute_hvp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        return self._run("hvp", self._tensor(x), self._tensor(p)).numpy()

    def _compute_hessian(self, x: np.ndarray) -> np.ndarray:
        return self._run("hessian", self._tensor(x)).numpy()

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
        p, hits, hp, count = self._run("steihaug", self._tensor(x), scalar(f), g, scalar(trust_radius))
        count = int(count)
        self.nhvp += abs(count)
        return p.numpy(), bool(hits), hp.numpy(), count

    def _tensor(self, x: np.ndarray) -> tf.Tensor:
        dtype = self.flat.common_dtype
        return tf.convert_to_tensor(x.astype(dtype.as_numpy_dtype, copy=False))

    def _run(self, name: str, *args: tf.Tensor) -> tf.Tensor:
        """Call compiled function ``name``; on an XLA failure fall back to plain TensorFlow."""
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

    # ---------------------------------------------------------------- graphs
    def _loss(self, batch: tuple[Any, Any, Any] | None) -> tf.Tensor:
        """Inside a graph: Keras's loss on a batch; ``None``: the weight regularizers alone."""
        if batch is None:
            return tf.add_n([tf.cast(loss, tf.float64) for loss in self.model.losses])
        x, y, sample_weight = batch
        y_pred = self.model(x, training=False)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        return tf.cast(loss, tf.float64)

    def _assign(self, x: tf.Tensor) -> None:
        for var, value in zip(self._tf_vars, self.flat.split(x), strict=True):
            var.assign(value)

    def _over_chunks(self, chunk_fn: Callable[[Any, Any], tuple]) -> tuple:
        """Sum ``chunk_fn(chunk, share)`` over all chunks (sequentially, memory-bounded).

        The shares follow ``self.rule``; where they do not sum to one (rule ``"sum"``), the
        weight regularizers, which every chunk's loss contains, are taken out ``k - 1`` times.
        """
        head, tail = self._chunks
        head_share, tail_share = self._shares()
        total = chunk_fn(_map_data(tf.convert_to_tensor, tail), tail_share) if self._weights[1] else None
        if head is not None:
            count = int(tf.nest.flatten(head)[0].shape[0])

            def chunk(i):
                return _map_data(lambda v: tf.gather(v, i), head)

            def body(i, acc):
                return i + 1, tuple(a + b for a, b in zip(acc, chunk_fn(chunk(i), head_share(i)), strict=True))

            if total is None:  # no tail: start from the first chunk
                start, acc = 1, chunk_fn(chunk(0), head_share(0))
            else:
                start, acc = 0, tuple(tf.zeros_like(t) for t in total)
            _, acc = tf.while_loop(lambda i, _: i < count, body, (tf.constant(start), acc), parallel_iterations=1)
            total = acc if total is None else tuple(a + b for a, b in zip(acc, total, strict=True))
        if self.rule == "sum":
            chunks = (0 if head is None else count) + (1 if self._weights[1] else 0)
            if chunks > 1 and self.model.losses:
                extra = chunk_fn(None, 1.0 - chunks)  # a chunk of no data: the regularizers alone
                total = tuple(a + b for a, b in zip(total, extra, strict=True))
        return total

    def _shares(self) -> tuple[Callable[[Any], Any], Any]:
        """Inside a graph: head chunk ``i``'s share of the loss (a function of ``i``) and the tail's."""
        if self.rule != "sample_weight":
            return (lambda i: self._weights[0]), self._weights[1]
        head, tail = self._chunks
        tail_sum = tf.reduce_sum(tf.cast(tf.nest.flatten(tail[2])[0], tf.float64))
        if head is None:
            return (lambda i: 1.0), tf.math.divide_no_nan(tail_sum, tail_sum)
        per_chunk = tf.cast(tf.nest.flatten(head[2])[0], tf.float64)
        per_chunk = tf.reduce_sum(tf.reshape(per_chunk, [per_chunk.shape[0], -1]), axis=1)
        total = tf.reduce_sum(per_chunk) + tail_sum
        return (lambda i: tf.math.divide_no_nan(tf.gather(per_chunk, i), total)), tf.math.divide_no_nan(tail_sum, total)

    def _rows(self, start: tf.Tensor, size: int) -> Any:
        """Inside a graph: rows ``[start, start + size)`` of the data, gathered from the chunk
        variables (row ``i`` is head chunk ``i // c``, row ``i % c``, or tail row ``i - full c``)
        without assembling the whole training set."""
        head, tail = self._chunks
        idx = start + tf.range(size)
        if head is None:
            return _map_data(lambda t: tf.gather(t, idx), tail)
        c = self._chunk_rows
        in_head = int(tf.nest.flatten(head)[0].shape[0]) * c
        at = tf.minimum(idx, in_head - 1)
        at = tf.stack([at // c, at % c], axis=1)
        from_tail = tf.maximum(idx - in_head, 0)

        def pick(h, t):
            rows = tf.gather_nd(tf.convert_to_tensor(h), at)  # a read, not a copy; XLA has no ResourceGatherNd
            if t.shape[0] == 0:
                return rows
            mask = tf.reshape(idx < in_head, [size] + [1] * (rows.shape.rank - 1))
            return tf.where(mask, rows, tf.gather(t, from_tail))

        return tf.nest.map_structure(lambda h, t: None if t is None else pick(h, t), head, tail)

    def _chunk_value(self, chunk: Any, weight: float) -> tuple:
        return (weight * self._loss(chunk),)

    def _chunk_grads(self, chunk: Any, weight: float) -> tuple[tf.Tensor, list[Any]]:
        """Weighted chunk loss and its gradient per variable (embeddings as ``IndexedSlices``)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._tf_vars)
            loss = weight * self._loss(chunk)
        return loss, tape.gradient(loss, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _chunk_value_and_grad(self, chunk: Any, weight: float) -> tuple:
        loss, grads = self._chunk_grads(chunk, weight)
        return loss, self.flat.concat(grads)

    def _chunk_hvp(self, chunk: Any, weight: float, p: tf.Tensor) -> tuple:
        if self.hvp_mode == "forward-over-reverse":
            with tf.autodiff.ForwardAccumulator(self._tf_vars, self.flat.split(p)) as acc:
                _, grad = self._chunk_value_and_grad(chunk, weight)
            return (acc.jvp(grad, unconnected_gradients=tf.UnconnectedGradients.ZERO),)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self._tf_vars)
            _, grads = self._chunk_grads(chunk, weight)
            grad_dot_p = _dot(grads, self.flat.split(p))
        hp = outer.gradient(grad_dot_p, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (self.flat.concat(hp),)

    def _graph_value(self, x):
        self.traces["value"] += 1
        self._assign(x)
        return self._over_chunks(self._chunk_value)[0]

    def _graph_value_and_grad(self, x):
        self.traces["value_and_grad"] += 1
        self._assign(x)
        loss, grad = self._over_chunks(self._chunk_value_and_grad)
        return tf.concat([tf.reshape(loss, [1]), grad], 0)

    def _hvp_at_current_weights(self, p):
        return self._over_chunks(lambda chunk, w: self._chunk_hvp(chunk, w, p))

    def _graph_hvp(self, x, p):
        self.traces["hvp"] += 1
        self._assign(x)
        return self._hvp_at_current_weights(p)[0]

    def _hvp_operator(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """Inside a graph, at the current weights: ``p -> H p`` in float64. With one chunk, the
        forward and backward passes are recorded once and each product is one more backward
        pass over them (a linearization, 0.65x a fresh HVP); with several chunks, each product
        runs over the chunks again (memory bounded by a chunk)."""
        head, tail = self._chunks
        if head is not None:
            return lambda p: self._hvp_at_current_weights(tf.cast(p, self.flat.common_dtype))[0]
        with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
            tape.watch(self._tf_vars)
            _, grads = self._chunk_grads(_map_data(tf.convert_to_tensor, tail), self._shares()[1])
            grads = [tf.convert_to_tensor(g) for g in grads]  # embeddings: densified on the tape

        def hvp(p):
            directions = self.flat.split(tf.cast(p, self.flat.common_dtype))
            hp = tape.gradient(grads, self._tf_vars, output_gradients=directions,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.cast(self.flat.concat(hp), tf.float64)

        return hvp

    def _graph_steihaug(self, x, f, g, radius):
        # scipy's CGSteihaugSubproblem.solve, step for step; status 0: go on, 1: non-positive
        # curvature, 2: the step leaves the region, 3: converged inside, 4: nothing to do, 5: NaN.
        self.traces["steihaug"] += 1
        self._assign(x)
        hvp = self._hvp_operator()
        dot = lambda a, b: tf.reduce_sum(a * b)  # noqa: E731

        def crossings(z, d):  # t with ||z + t d|| = radius, low and high (scipy's formula)
            a, b, c = dot(d, d), 2.0 * dot(z, d), dot(z, z) - radius**2
            root = tf.sqrt(b * b - 4.0 * a * c)
            aux = b + tf.where(b < 0, -root, root)
            ta, tb = -aux / (2.0 * a), -2.0 * c / aux
            return tf.minimum(ta, tb), tf.maximum(ta, tb)

        g_norm = tf.norm(g)
        tolerance = tf.minimum(tf.constant(0.5, tf.float64), tf.sqrt(g_norm)) * g_norm
        zero = tf.zeros_like(g)

        def body(z, r, d, count, status, p):
            bd = hvp(d)
            dbd = dot(d, bd)
            r_sq = dot(r, r)
            alpha = r_sq / dbd
            z_next = z + alpha * d
            r_next = r + alpha * bd
            r_next_sq = dot(r_next, r_next)
            status = tf.where(~tf.math.is_finite(dbd), 5, tf.where(dbd <= 0, 1, tf.where(
                tf.norm(z_next) >= radius, 2, tf.where(tf.sqrt(r_next_sq) < tolerance, 3, 0))))
            go_on = tf.equal(status, 0)
            p = tf.where(tf.equal(status, 2), z + crossings(z, d)[1] * d, z_next)
            d_next = -r_next + (r_next_sq / r_sq) * d
            return (tf.where(go_on, z_next, z), tf.where(go_on, r_next, r), tf.where(go_on, d_next, d), count + 1,
                    status, p)

        start = tf.where(g_norm < tolerance, 4, 0)
        z, _, d, count, status, p = tf.while_loop(
            lambda *state: tf.equal(state[4], 0), body, (zero, g, -g, tf.constant(0), start, zero))

        def boundary_by_model():  # the crossing with the lower model value (two more HVPs, as scipy)
            ta, tb = crossings(z, d)
            pa, pb = z + ta * d, z + tb * d
            ma, mb = (f + dot(g, q) + 0.5 * dot(q, hvp(q)) for q in (pa, pb))
            return tf.where(ma < mb, pa, pb)

        curved = tf.equal(status, 1)
        p = tf.cond(curved, boundary_by_model, lambda: tf.where(tf.equal(status, 4), zero, p))
        count += tf.where(curved, 2, 0)
        hp = hvp(p)  # scipy's m(p) for the predicted reduction
        count += 1
        bad = tf.equal(status, 5) | ~tf.reduce_all(tf.math.is_finite(hp))
        return p, (status == 1) | (status == 2), hp, tf.where(bad, -count, count)

    def _graph_hessian(self, x):
        # One HVP per unit vector in a sequential loop: memory stays at one HVP plus H.
        self.traces["hessian"] += 1
        self._assign(x)
        n = self.flat.size
        rows = tf.map_fn(
            lambda e: self._hvp_at_current_weights(e)[0],
            tf.eye(n, dtype=tf.float64),
            parallel_iterations=1,
            fn_output_signature=tf.float64,
        )
        return 0.5 * (rows + tf.transpose(rows))


def _map_data(fn: Callable[[Any], Any], data: Any) -> Any:
    """Apply ``fn`` to every tensor of a data structure, keeping ``None`` (no y, no weights)."""
    return tf.nest.map_structure(lambda t: None if t is None else fn(t), data)


def _dot(grads: list[Any], directions: list[tf.Tensor]) -> tf.Tensor:
    """Inside a graph: sum of <g_i, p_i> in float64. Embedding gradients (``IndexedSlices``) are
    not densified: their rows meet the gathered rows of p (repeated indices count each time,
    as in the dense sum), which keeps the second backward pass sparse too (1.45x instead of
    1.8x a gradient on the factorization)."""
    terms = []
    for g, p in zip(grads, directions, strict=True):
        if isinstance(g, tf.IndexedSlices):
            g, p = g.values, tf.gather(p, g.indices)
        terms.append(tf.reduce_sum(tf.cast(g, tf.float64) * tf.cast(p, tf.float64)))
    return tf.add_n(terms)


def _batch_level_losses(model: Any, y: Any, outputs: list[Any]) -> list[str]:
    """Inside the check's trace: the custom compiled losses not seen to return one value per sample
    (one that reduces over the batch itself does not add up over chunks)."""
    customs = [loss for loss in _keras.loss_leaves(model) if not _keras.is_builtin_loss(loss)]
    targets = tf.nest.flatten(y)
    if len(customs) == 1 and len(outputs) == 1 and len(targets) == 1:
        try:
            values = _keras.per_sample_values(customs[0], targets[0], outputs[0])
            if values.shape.rank and values.shape[0] == outputs[0].shape[0]:
                return []
        except Exception:  # noqa: BLE001 -- any failure means: not known to be per sample
            pass
    return [getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__ for loss in customs]


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
