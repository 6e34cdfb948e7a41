"""History counts copied from scipy's OptimizeResult instead of the calls scipy really made."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class ResultCounts(ScipyTrainFunction):
    def _finish(self, objective, result, x0, bounds, calls, progress):
        reported = {k: int(result.get(k, 0) or 0) for k in ("nfev", "njev", "nhev")}
        logs = super()._finish(objective, result, x0, bounds, calls, progress)
        logs.update(reported)
        return logs


make_train_function = factory(train_class=ResultCounts)
