"""The full-batch objective over a ``tf.distribute`` strategy: the data sharded across replicas.

When the model's variables belong to a strategy (``MirroredStrategy`` over the devices of one
machine, ``MultiWorkerMirroredStrategy`` over machines), ``f(x)`` is still Keras's loss over the
whole training set, as :class:`~keras_opt_ref.backends.tensorflow.objective.TensorFlowObjective` computes it on one
device. What changes is where the rows live and who sums them:

- each local replica holds a contiguous shard of the rows ``fit`` gave this process, on its own
  device, cut into chunks of at most ``chunk_size`` rows (memory per replica is one chunk);
- each evaluation is one ``strategy.run``: every replica sums its chunks' weighted losses
  (gradients, HVPs) in a loop compiled with XLA on its device, then one ``strategy.reduce``
  (SUM) adds the replicas up -- tf.distribute's own all-reduce, across workers too;
- the chunk shares are the single-device rule's (``checks.chunk_rule``) against global totals
  (rows, sample weights, chunks) all-reduced once per data set, so shards of unequal size add up
  to the single-device value to float64 rounding; rule ``"sum"``'s regularizer correction sits
  on replica 0 only, so the weight regularizers are counted once. (Keras divides its loss by the
  number of replicas in replica context, for its own gradient all-reduce; the shares undo that.)

The weights are set from ``x`` in cross-replica context (a mirrored assign reaches every replica)
before the ``strategy.run``; on several workers every worker runs the same scipy loop on the same
all-reduced numbers, so the iterates agree. A loss that no chunk rule adds up exactly (masks,
``add_loss`` terms, custom losses that may reduce over the batch, an overridden ``compute_loss``)
cannot be split across replicas, and is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ...base import checks
from .flat import tf_variable
from .graphs import _map_data
from .objective import PEER_ERRORS, TensorFlowObjective

__all__ = ["DistributedObjective", "WorkerFailedError", "strategy_of"]

_SUM = tf.distribute.ReduceOp.SUM


def strategy_of(model: Any) -> Any:
    """The ``tf.distribute`` strategy the model's variables were created under, or ``None``."""
    for variable in model.trainable_variables:
        var = tf_variable(variable)
        if isinstance(var, tf.distribute.DistributedValues):
            return var.distribute_strategy
    return None


class WorkerFailedError(RuntimeError):
    """Another worker of a multi-worker run failed: the all-reduce cannot complete."""


class DistributedObjective(TensorFlowObjective):
    """Keras's full-batch loss with the data sharded over the model's ``tf.distribute`` strategy;
    parameters as :class:`~keras_opt_ref.backends.tensorflow.objective.TensorFlowObjective`."""

    def __init__(self, model: Any, x: Any, y: Any = None, sample_weight: Any = None, **settings: Any) -> None:
        self.strategy = strategy_of(model)
        if self.strategy is None:
            raise ValueError("DistributedObjective needs a model built under a tf.distribute strategy's scope().")
        if settings.get("loss_over_rows") is not None:
            # The replica shares undo Keras's division of its loss by the replicas, which an overridden
            # compute_loss may not do: a declared rule is not measured across replicas yet.
            raise ValueError(
                f"loss_over_rows is not supported under a tf.distribute strategy yet (the model was built under "
                f"{type(self.strategy).__name__}'s scope): a loss whose terms are unknown may not divide by the "
                "replicas as Keras's own compute_loss does. Build the model outside strategy.scope() to chunk it."
            )
        self._replica_data: Any = None
        self._traced_data: Any = None
        super().__init__(model, x, y, sample_weight, **settings)

    # ------------------------------------------------------------------ data
    def _without_rule(self, n: int, rows: int) -> int:
        raise ValueError(
            f"This model's loss cannot be split across the {self.strategy.num_replicas_in_sync} replicas of "
            f"{type(self.strategy).__name__} exactly: {self.why}. Train it without a strategy (build the model "
            "outside strategy.scope()), where it is evaluated in one piece or, with loss_over_rows, in chunks."
        )

    def _hold(self, data: tuple[Any, Any, Any], rows: int) -> None:
        local = list(self.strategy.extended.worker_devices)
        n = self.num_samples
        if n < len(local):
            raise ValueError(
                f"{n} samples cannot be shared by the {len(local)} replicas of this process: each needs at least "
                "one row. Use fewer devices or more data."
            )
        self._data = data
        bounds = np.linspace(0, n, len(local) + 1).round().astype(int)  # shards of n // R or n // R + 1 rows
        rows = min(self.chunk_size, int(np.diff(bounds).min()))
        shards = [self._layout(data, a, b, rows) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        chunks, weight = sum(len(s["counts"]) for s in shards), sum(s["weight"] for s in shards)
        totals = self._all_reduce(np.array([n, chunks, weight]))  # rows, chunks, sample weights of all workers
        self.total_samples = int(totals[0])  # over all workers (num_samples: this process's)
        first, replicas = self._first_replica_id(), self.strategy.num_replicas_in_sync
        pieces = []
        for j, shard in enumerate(shards):
            # In replica context Keras divides its loss by the number of replicas (for its own
            # gradient all-reduce: keras.losses scale_loss_for_distribution, tf_keras's compile_utils):
            # every term but a reduction="sum" compiled loss. The shares undo it.
            if self.rule == "rows":
                shares = shard["counts"] / totals[0] * replicas
            elif self.rule == "sum":  # the data term unscaled, the regularizers in each chunk / replicas
                shares = np.ones(len(shard["counts"]))
            else:  # "sample_weight": each chunk's sum of weights over all of them (0 if they sum to 0)
                shares = shard["weights"] / totals[2] * replicas if totals[2] else np.zeros(len(shard["counts"]))
            # rule "sum": all chunks held the regularizers / replicas; the regularizers alone (unscaled)
            # make up the difference to once, on replica 0
            extra = (1.0 - totals[1] / replicas) if self.rule == "sum" and first + j == 0 else 0.0
            with tf.device(local[j]):
                pieces.append(tf.nest.map_structure(
                    lambda t: None if t is None else tf.identity(t),
                    (shard["head"], shard["tail"], tf.constant(shares[:-1]), tf.constant(shares[-1]),
                     tf.constant(extra, tf.float64))))
        self._replica_data = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: pieces[ctx.replica_id_in_sync_group - first])
        self._chunk_rows = rows
        self._concrete = {}  # the functions take the data as an argument: new shapes, new traces

    def _layout(self, data: Any, start: int, stop: int, rows: int) -> dict[str, Any]:
        """Rows ``[start, stop)`` as ``k`` whole chunks of ``rows`` and a tail of 1 to ``rows`` rows
        (the same structure on every replica), with each chunk's row count and weight sum."""
        m = stop - start
        k = (m - 1) // rows
        part = _map_data(lambda t: t[start:stop], data)
        head = _map_data(lambda t: tf.reshape(t[: k * rows], [k, rows, *t.shape[1:]]), part)
        tail = _map_data(lambda t: t[k * rows :], part)
        counts = np.array([rows] * k + [m - k * rows], dtype=np.float64)
        weights = np.zeros(len(counts))
        if self.rule == "sample_weight":
            w = tf.cast(tf.reshape(tf.nest.flatten(part[2])[0], [m, -1]), tf.float64).numpy().sum(axis=1)
            weights = np.add.reduceat(w, np.arange(0, m, rows)) if m else weights
        return {"head": head, "tail": tail, "counts": counts, "weights": weights, "weight": float(weights.sum())}

    def _graph_check(self, batch: tuple[Any, Any, Any]) -> Any:
        # In replica context, as Keras computes its loss under a strategy (tf-keras's loss metrics
        # cannot update in cross-replica context); each replica checks the same chunk.
        return self.strategy.run(super()._graph_check, args=(batch,))

    def _all_reduce(self, values: np.ndarray) -> np.ndarray:
        """Sum ``values`` (this process's totals) over the workers, through the strategy."""
        zeros = np.zeros_like(values)
        per_replica = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values if ctx.replica_id_in_sync_group == self._first_replica_id() else zeros))
        return self.strategy.reduce(_SUM, per_replica, axis=None).numpy()

    def _first_replica_id(self) -> int:
        """The global id of this process's first replica (0 on one machine, and on the chief), as the
        strategy numbers its replicas (a cluster with a "chief" task puts it first)."""
        if getattr(self, "_first_id", None) is None:
            ids: list[int] = []
            self.strategy.experimental_distribute_values_from_function(
                lambda ctx: ids.append(ctx.replica_id_in_sync_group) or tf.constant(0))
            self._first_id = min(ids)
        return self._first_id

    @property
    def is_chief(self) -> bool:
        """Whether this process is worker 0 (or the only one): the one that prints progress."""
        return self._first_replica_id() == 0

    @property
    def data(self) -> tuple[Any, Any, Any]:
        """This process's training set ``(x, y, sample_weight)`` as tensors."""
        return self._data

    # ------------------------------------------------------------- functions
    def _build_functions(self) -> None:
        names = ("value", "value_and_grad", "hvp", "hessian", "steihaug")
        # The outer function sets the weights and runs the replicas; each replica's chunk loop is
        # compiled on its device (_over_chunks). strategy.run itself is not XLA-compilable.
        self._functions = {name: tf.function(self._with_data(getattr(self, f"_graph_{name}"))) for name in names}
        self._concrete = {}

    def _with_data(self, graph: Any) -> Any:
        def traced(data: Any, *args: Any) -> Any:
            self._traced_data = data
            try:
                return graph(*args)
            finally:
                self._traced_data = None

        return traced

    def _concrete_function(self, name: str) -> Any:
        fn = self._concrete.get(name)
        if fn is None:
            size, scalar = self.flat.size, tf.TensorSpec([], tf.float64)
            spec = tf.TensorSpec([size], self.flat.common_dtype)
            specs = {"hvp": (spec, spec), "steihaug": (spec, scalar, tf.TensorSpec([size], tf.float64), scalar)}
            concrete = self._functions[name].get_concrete_function(self._replica_data, *specs.get(name, (spec,)))
            fn = self._concrete[name] = lambda *args: concrete(self._replica_data, *args)
        return fn

    def _run(self, name: str, *args: tf.Tensor) -> tf.Tensor:
        try:
            return super()._run(name, *args)
        except PEER_ERRORS as exc:
            raise WorkerFailedError(
                f"A worker of this {self.strategy.num_replicas_in_sync}-replica {type(self.strategy).__name__} run "
                f"failed or stopped answering ({checks.summary(exc)}), so the all-reduce of the objective cannot "
                "complete and this worker stops too. The train function leaves the model at the best point found so "
                "far (train.result.x); restart every worker to go on from there."
            ) from exc

    def _over_chunks(self, chunk_fn: Any) -> tuple:
        """Inside the outer graph: ``chunk_fn(chunk, share)`` summed over every replica's chunks
        (one ``strategy.run``, each replica's loop XLA-compiled), then all-reduced."""
        with_regularizers = self.rule == "sum" and bool(self.model.losses)

        def replica_sum(data: Any) -> tuple:
            head, tail, head_shares, tail_share, extra = data
            total = chunk_fn(tail, tail_share)

            def body(i, acc):
                chunk = _map_data(lambda t: tf.gather(t, i), head)
                return i + 1, tuple(a + b for a, b in zip(acc, chunk_fn(chunk, tf.gather(head_shares, i)), strict=True))

            _, total = tf.while_loop(lambda i, _: i < tf.shape(head_shares)[0], body, (tf.constant(0), total),
                                     parallel_iterations=1)
            if with_regularizers:  # a chunk of no data: the regularizers alone, on replica 0
                total = tuple(a + b for a, b in zip(total, chunk_fn(None, extra), strict=True))
            return total

        compiled = tf.function(replica_sum, jit_compile=self.jit_compile)

        def on_replica(data: Any) -> tuple:
            with tf.device(tf.nest.flatten(data)[0].device):  # XLA's cluster on the replica's device
                return compiled(data)

        per_replica = self.strategy.run(on_replica, args=(self._traced_data,))
        return tuple(self.strategy.reduce(_SUM, t, axis=None) for t in per_replica)

    def _hvp_operator(self) -> Any:
        # One linearization per replica is not shared across strategy.run calls: every product
        # runs the replicas' chunks again.
        return lambda p: self._hvp_at_current_weights(tf.cast(p, self.flat.common_dtype))[0]
