"""Keras NonNeg constraints ignored: they never become bounds, so the weights go negative."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction
from keras_opt_ref.train import methods

from ._base import factory


class NoNonNeg(ScipyTrainFunction):
    def run(self, x, y=None, sample_weight=None):
        real = methods.nonneg_variables
        methods.nonneg_variables = lambda flat: []
        try:
            return super().run(x, y, sample_weight)
        finally:
            methods.nonneg_variables = real


make_train_function = factory(train_class=NoNonNeg)
