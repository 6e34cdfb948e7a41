"""On an interrupt or a non-finite result nothing is restored: the model keeps whatever weights the last
evaluation assigned (a NaN point, or wherever the interrupt struck)."""

import math

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class NothingKept(ScipyTrainFunction):
    def _finish(self, objective, result, x0, bounds, calls, progress):
        failed = result.get("status") == -1 or not math.isfinite(float(result.get("fun", math.nan)))
        if failed and objective._memo_x is not None:
            objective.best_x, objective.best_value = None, math.inf
            result.x, result.fun = objective._memo_x.copy(), 0.0  # trust the last evaluation
        return super()._finish(objective, result, x0, bounds, calls, progress)


make_train_function = factory(train_class=NothingKept)
