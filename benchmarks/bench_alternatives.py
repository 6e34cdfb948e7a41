"""asv: the reference against what users would use instead."""

from __future__ import annotations

import math

import numpy as np

from keras_opt_ref import TensorFlowObjective
from keras_opt_ref.bench import alternatives, baselines, measure, side_by_side, workloads

from ._common import ADAM_SECONDS, RUN_MAXITER


class HandWritten:
    """Analytic NumPy / scipy.sparse gradients for the same loss: a lower bound."""

    params = (["linear", "factorization"],)
    param_names = ("workload",)

    def setup(self, name):
        w = workloads.make_workload(name, "medium")
        self.workload = w
        objective = TensorFlowObjective(w.model, w.x, w.y)
        self.manual = measure.hand_written(w, objective.flat)
        self.point = measure.cycling_points(objective.flat.read(), 7)

    def time_hand_written_loss_and_gradient(self, name):
        self.manual.value_and_grad(self.point())

    def track_reference_over_hand_written(self, name):
        return measure.hand_written_costs(self.workload, rounds=9)["reference / hand-written"].median

    track_reference_over_hand_written.unit = "ratio"


class PerBatchLoop:
    """The earlier keras-opt designs: a Python loop over batches of 32 per evaluation."""

    timeout = 600

    def setup(self):
        w = workloads.make_workload("factorization", "medium")
        self.workload = w
        self.loop = baselines.PerBatchLoop(w.model, w.x, w.y, batch_size=32)
        self.point = measure.cycling_points(self.loop.flat.read(), 3)
        self.loop.value_and_grad(self.point())

    def time_per_batch_loop_evaluation(self):
        self.loop.value_and_grad(self.point())

    def track_per_batch_loop_over_reference(self):
        return measure.per_batch_loop_costs(self.workload, rounds=3)["loop / reference"].median

    track_per_batch_loop_over_reference.unit = "ratio"


class TimeToTarget:
    """Seconds for the best full-batch method to reach Adam's best loss, over Adam's seconds."""

    timeout = 3600
    number = 1
    repeat = 1

    def setup_cache(self):
        adam, _, _ = measure.adam_reference("medium", seconds=ADAM_SECONDS)
        target = float(np.nanmin(adam[:, 1]))
        adam_time = measure.time_to_target(adam, target)
        times = {}
        for method in ("L-BFGS-B", "CG", "Newton-CG", "trust-ncg", "trust-krylov"):
            run = measure.run_method(workloads.make_workload("factorization", "medium"), method, maxiter=500)
            times[method] = measure.time_to_target(run.trace, target)
        return {"adam": adam_time, "methods": times}

    def track_best_full_batch_over_adam(self, cache):
        best = min((t for t in cache["methods"].values() if math.isfinite(t)), default=math.nan)
        return best / cache["adam"]

    track_best_full_batch_over_adam.unit = "ratio"

    def track_adam_seconds_to_its_best(self, cache):
        return cache["adam"]

    track_adam_seconds_to_its_best.unit = "seconds"


class LbfgsLibraries:
    """Other libraries' L-BFGS against the reference's (scipy L-BFGS-B through ``fit``): seconds to a
    common target, from the same start, every contender in its own process (``keras_opt_ref.bench.side_by_side``;
    the reference on TensorFlow is the denominator). Missing packages skip."""

    params = (["mlp", "factorization"], list(alternatives.CONTENDERS))
    param_names = ("workload", "contender")
    timeout = 3600
    number = 1
    repeat = 1

    def setup_cache(self):
        cache = {}
        for name in self.params[0]:
            rows = side_by_side.side_by_side(name, "medium", maxiter=RUN_MAXITER, rounds=3, orders=1, processes=1,
                                             say=lambda line: None)["rows"]
            cache[name] = {who: {"ratio": row["/ reference"][0], "seconds": row["median s to target"][0]}
                           for who, row in rows.items() if "failed" not in row}
        return cache

    def setup(self, cache, name, contender):
        if alternatives.skip_reason(contender):
            raise NotImplementedError(alternatives.skip_reason(contender))

    def track_seconds_to_target_over_reference(self, cache, name, contender):
        return cache[name][contender]["ratio"]

    track_seconds_to_target_over_reference.unit = "ratio"

    def track_seconds_to_target(self, cache, name, contender):
        return cache[name][contender]["seconds"]

    track_seconds_to_target.unit = "seconds"
