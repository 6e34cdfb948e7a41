"""The model is left at the last point evaluated (what the variables happen to hold), not at result.x."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class LastEvaluated(ScipyTrainFunction):
    def _finish(self, objective, result, x0, bounds, calls, progress):
        if objective._memo_x is not None:
            result.x = objective._memo_x.copy()
        return super()._finish(objective, result, x0, bounds, calls, progress)


make_train_function = factory(train_class=LastEvaluated)
