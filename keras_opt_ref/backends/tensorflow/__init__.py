"""The TensorFlow backend: Keras 3 on TensorFlow, and tf-keras.

``objective`` (value, gradient, HVP, Hessian graphs over chunks), ``graphs`` (what runs inside
them), ``steihaug`` (trust-ncg's subproblem in one compiled call), ``least_squares`` (residuals,
Jacobian, Gauss-Newton), ``distributed`` (the data sharded over a ``tf.distribute`` strategy),
``fit`` (how Keras's TensorFlow ``fit`` calls the train function). TensorFlow is imported by the
modules, not here: the registry reads ``TITLE`` and ``CAPABILITIES`` without it.
"""

from __future__ import annotations

from typing import Any

TITLE = "TensorFlow"
CAPABILITIES = frozenset({"least_squares", "gauss_newton", "in_graph_subproblem"})


def objective_class(model: Any, least_squares: str = "") -> type:
    """:class:`~.least_squares.LeastSquaresObjective` when residuals are needed, else
    :class:`~.distributed.DistributedObjective` under a ``tf.distribute`` strategy, else
    :class:`~.objective.TensorFlowObjective`."""
    from .distributed import DistributedObjective, strategy_of

    distributed = strategy_of(model) is not None
    if least_squares:
        if distributed:
            raise ValueError(
                f"{least_squares} (least squares) is not available for a model under a tf.distribute strategy: its "
                "residuals and Jacobian are held on one device. Use a minimize method with the exact Hessian "
                "(method='trust-ncg', 'trust-krylov', 'Newton-CG') or L-BFGS-B, whose values, gradients and "
                "Hessian-vector products are summed over the replicas; or build the model outside strategy.scope()."
            )
        from .least_squares import LeastSquaresObjective

        return LeastSquaresObjective
    if distributed:
        return DistributedObjective
    from .objective import TensorFlowObjective

    return TensorFlowObjective

