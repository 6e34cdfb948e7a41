"""scipy runs correctly, then fit crashes (AttributeError) before returning: no check may pass on it."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class CrashAfter(ScipyTrainFunction):
    def run(self, x, y=None, sample_weight=None):
        super().run(x, y, sample_weight)
        return None.logs  # noqa -- the crash under test


make_train_function = factory(train_class=CrashAfter)
