"""result.x written back only when scipy reports success: a run stopped by maxiter leaves the start weights."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class OnlyOnSuccess(ScipyTrainFunction):
    def _finish(self, objective, result, x0, bounds, calls, progress):
        if not result.get("success", False):
            result.x = x0
        return super()._finish(objective, result, x0, bounds, calls, progress)


make_train_function = factory(train_class=OnlyOnSuccess)
