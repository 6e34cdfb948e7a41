"""asv: physics-informed networks (keras_opt_ref.bench.pinn): per-evaluation cost and time to an error target.

``PinnEvaluation`` times one loss-and-gradient and one Hessian-vector product of the reference's objective
(a third and a fourth derivative of the network). ``PinnTimeToError`` runs every contender of
``keras_opt_ref.bench.pinn_timing.race`` in its own process (Adam, then the reference's L-BFGS-B on each
installed Keras backend, a hand-written set_weights L-BFGS-B in float64 and float32, tfp's lbfgs_minimize)
and tracks each one's seconds to the relative L2 error target and its ratio to the reference on TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np

from keras_opt_ref import backends
from keras_opt_ref.bench import pinn, pinn_timing

from ._common import ADAM_SECONDS, RUN_MAXITER

# CI (KERAS_OPT_BENCH_MAXITER=5) runs every benchmark once with a few iterations: the target is then
# not reached and the seconds are nan, which asv records as a failed measurement only for that run.
_MAXITER = 5000 if RUN_MAXITER >= 200 else RUN_MAXITER
_ADAM_EPOCHS = 100 if ADAM_SECONDS >= 10 else 5


class PinnEvaluation:
    params = (list(pinn.PINNS), ["small", "medium"])
    param_names = ("workload", "size")

    def setup(self, name, size):
        work = pinn.make_pinn(name, size)
        self.objective = backends.make_objective(work.model, work.x, work.y)
        self.x = self.objective.flat.read()
        self.p = np.random.default_rng(0).normal(size=self.x.size)
        self.objective.value_and_grad(self.x)  # tracing and compilation: not timed
        self.objective.hessp(self.x, self.p)

    def time_loss_and_gradient(self, name, size):
        self.objective.forget()
        self.objective.value_and_grad(self.x)

    def time_hvp(self, name, size):
        self.objective.hessp(self.x, self.p)


class PinnTimeToError:
    """Seconds to a relative L2 error of 1e-2 on poisson2d-small, each contender in its own process."""

    params = ([c for c in pinn_timing.CONTENDERS if c != "adam+reference"]
              + [f"adam+reference ({b})" for b in pinn_timing.REFERENCE_BACKENDS],)
    param_names = ("contender",)
    timeout = 3600
    number = 1
    repeat = 1

    def setup_cache(self):
        return pinn_timing.race("poisson2d", "small", target=1e-2, adam_epochs=_ADAM_EPOCHS, maxiter=_MAXITER,
                                adam_alone_steps=min(_MAXITER, 3000), say=lambda line: None)["rows"]

    def setup(self, rows, contender):
        if "skipped" in rows[contender]:
            raise NotImplementedError(rows[contender]["skipped"])

    def track_seconds_to_error(self, rows, contender):
        seconds = rows[contender].get("seconds")
        return math.nan if seconds is None else seconds

    track_seconds_to_error.unit = "seconds"

    def track_seconds_to_error_over_reference(self, rows, contender):
        ratio = rows[contender].get("/ reference")
        return math.nan if ratio is None else ratio

    track_seconds_to_error_over_reference.unit = "ratio"
