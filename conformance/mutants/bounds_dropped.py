"""bounds= accepted and validated, then never handed to scipy."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class NoBounds(ScipyTrainFunction):
    def run(self, x, y=None, sample_weight=None):
        self.bounds = None
        return super().run(x, y, sample_weight)


make_train_function = factory(train_class=NoBounds)
