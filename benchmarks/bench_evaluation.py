"""asv: cost of one evaluation, and its ratio to the floor and to the same math by hand, per workload and size."""

from __future__ import annotations

import numpy as np

from keras_opt_ref import FlatVariables, TensorFlowObjective
from keras_opt_ref.bench import boundary, measure, same_math, workloads

from ._common import SIZES, WORKLOADS


class Evaluation:
    params = (list(WORKLOADS), list(SIZES))
    param_names = ("workload", "size")
    timeout = 300

    def setup(self, name, size):
        self.workload = workloads.make_workload(name, size)
        self.objective = TensorFlowObjective(self.workload.model, self.workload.x, self.workload.y)
        self.floor = measure.floor_function(self.objective)
        x0 = self.objective.flat.read()
        self.point = measure.cycling_points(x0, 7)
        self.p = np.random.default_rng(1).normal(size=x0.size)
        self.floor()
        self.objective.value_and_grad(self.point())
        self.objective.hessp(x0, self.p)

    def time_floor(self, name, size):
        self.floor()

    def time_loss_and_gradient(self, name, size):
        self.objective.value_and_grad(self.point())

    def time_hvp(self, name, size):
        self.objective.hessp(self.point(), self.p)

    def peakmem_loss_and_gradient(self, name, size):
        self.objective.value_and_grad(self.point())

    def track_loss_and_gradient_over_floor(self, name, size):
        return measure.evaluation_costs(self.workload, rounds=9)["loss+grad / floor"].median

    track_loss_and_gradient_over_floor.unit = "ratio"

    def track_hvp_over_gradient(self, name, size):
        return measure.evaluation_costs(self.workload, rounds=9)["hvp / loss+grad"].median

    track_hvp_over_gradient.unit = "ratio"


class DenseHessian:
    """The dense Hessian on the small MLP (545 weights), one HVP per weight in a graph loop."""

    timeout = 300

    def setup(self):
        w = workloads.make_workload("mlp", "small")
        self.workload = w
        self.objective = TensorFlowObjective(w.model, w.x, w.y)
        self.x0 = self.objective.flat.read()
        self.objective.hessian(self.x0)

    def time_dense_hessian(self):
        self.objective.hessian(self.x0)

    def track_dense_hessian_over_gradient(self):
        return measure.evaluation_costs(self.workload, rounds=3, dense_hessian=True)["hessian / loss+grad"].median

    track_dense_hessian_over_gradient.unit = "ratio"


class SameMath:
    """The reference against the same math hand-written on a flat vector (``keras_opt_ref.bench.same_math``).

    ``same_math``: one backend, or ``"best"`` (per round, the fastest installed one). A backend
    whose package is missing is skipped.
    """

    params = (list(WORKLOADS), ["best", *measure.SAME_MATH_BACKENDS])
    param_names = ("workload", "same_math")
    timeout = 1800

    def setup_cache(self):
        return {name: {k: v.median for k, v in measure.same_math_costs(workloads.make_workload(name, "medium"),
                                                                     rounds=9).items()}
                for name in WORKLOADS}

    def setup(self, cache, name, backend):
        reason = backend != "best" and same_math.backend_skip_reason(backend)
        if reason:
            raise NotImplementedError(reason)

    def track_loss_and_gradient_over_same_math(self, cache, name, backend):
        return cache[name][f"loss+grad / {backend} same-math"]

    track_loss_and_gradient_over_same_math.unit = "ratio"

    def track_hvp_over_same_math_hvp(self, cache, name, backend):
        return cache[name][f"hvp / {backend} same-math hvp"]

    track_hvp_over_same_math_hvp.unit = "ratio"

    def track_same_math_hvp_over_its_gradient(self, cache, name, backend):
        return cache[name][f"{backend} same-math hvp / loss+grad"]

    track_same_math_hvp_over_its_gradient.unit = "ratio"


class SameMathCalls:
    """Seconds per same-math loss+gradient and HVP call, per workload, size and backend."""

    params = (list(WORKLOADS), list(SIZES), list(same_math.BACKENDS))
    param_names = ("workload", "size", "same_math")
    timeout = 300

    def setup(self, name, size, backend):
        reason = same_math.backend_skip_reason(backend)
        if reason:
            raise NotImplementedError(reason)
        w = workloads.make_workload(name, size)
        self.fn = same_math.same_math(w, backend)
        x0 = FlatVariables.from_variables(w.model.trainable_variables).read()
        self.point = measure.cycling_points(x0, 7)
        self.p = np.random.default_rng(1).normal(size=x0.size)
        self.fn.value_and_grad(self.point())
        self.fn.hessp(x0, self.p)

    def time_loss_and_gradient(self, name, size, backend):
        self.fn.value_and_grad(self.point())

    def time_hvp(self, name, size, backend):
        self.fn.hessp(self.point(), self.p)


class Boundary:
    """One evaluation taken apart on TensorFlow (``keras_opt_ref.bench.boundary``; every backend, each in its own
    process: ``keras-opt-ref bench --boundary``): the part of an evaluation that is not the compiled call, and
    the evaluation over the same math hand-written in Keras's form."""

    params = (["mlp", "factorization"],)
    param_names = ("workload",)
    timeout = 900

    def setup_cache(self):
        return {name: boundary.measure(name, "medium", rounds=9) for name in ("mlp", "factorization")}

    def track_boundary_ms(self, cache, name):
        return cache[name]["boundary ms"][0]

    track_boundary_ms.unit = "ms"

    def track_evaluation_over_same_math_keras_form(self, cache, name):
        return cache[name]["evaluation / same-math keras evaluation"][0]

    track_evaluation_over_same_math_keras_form.unit = "ratio"
