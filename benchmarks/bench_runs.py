"""asv: one full-batch fit epoch per workload and method: seconds, final loss, counts."""

from __future__ import annotations

from keras_opt_ref.bench import measure, workloads

from ._common import RUN_MAXITER, WORKLOADS


class Runs:
    params = (list(WORKLOADS), list(measure.RUN_METHODS))
    param_names = ("workload", "method")
    timeout = 600
    number = 1
    repeat = 1

    def setup_cache(self):
        results = {}
        for name in WORKLOADS:
            for method in measure.RUN_METHODS:
                if measure.skip_reason(name, method):
                    continue
                run = measure.run_method(workloads.make_workload(name, "medium"), method, maxiter=RUN_MAXITER)
                results[(name, method)] = run.__dict__ | {"trace": None}
        return results

    def setup(self, cache, name, method):
        if (name, method) not in cache:
            raise NotImplementedError(f"{method} is not run on {name}: {measure.skip_reason(name, method)}")
        self.workload = workloads.make_workload(name, "medium")

    def time_fit_epoch(self, cache, name, method):
        measure.run_method(self.workload, method, maxiter=RUN_MAXITER)

    def track_final_loss(self, cache, name, method):
        return cache[(name, method)]["loss"]

    track_final_loss.unit = "loss"

    def track_nfev(self, cache, name, method):
        return cache[(name, method)]["nfev"]

    track_nfev.unit = "evaluations"

    def track_nhev(self, cache, name, method):
        return cache[(name, method)]["nhev"]

    track_nhev.unit = "evaluations"

    def track_nit(self, cache, name, method):
        return cache[(name, method)]["nit"]

    track_nit.unit = "iterations"


class LeastSquaresComparison:
    """lm, trf, trust-ncg with Gauss-Newton and with the exact Hessian, L-BFGS-B on mlp-medium."""

    params = ([label for label, _, _ in measure.LEAST_SQUARES_CONTENDERS],)
    param_names = ("contender",)
    timeout = 3600
    number = 1
    repeat = 1

    def setup_cache(self):
        target, rows = measure.least_squares_comparison("medium", maxiter=min(RUN_MAXITER, 10))
        return {label: {"seconds": r.seconds, "loss": r.loss, "nfev": r.nfev, "to_target": t}
                for label, r, t in rows} | {"target": target}

    def track_seconds_to_common_target(self, cache, contender):
        return cache[contender]["to_target"]

    track_seconds_to_common_target.unit = "seconds"

    def track_final_loss(self, cache, contender):
        return cache[contender]["loss"]

    track_final_loss.unit = "loss"
