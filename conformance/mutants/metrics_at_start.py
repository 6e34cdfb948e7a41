"""Compiled metrics computed before the run (at the start weights) and reported as the epoch's."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class MetricsAtStart(ScipyTrainFunction):
    def run(self, x, y=None, sample_weight=None):
        start = self.model.evaluate(x, y, sample_weight=sample_weight, batch_size=len(y), verbose=0, return_dict=True)
        logs = super().run(x, y, sample_weight)
        logs.update({k: float(v) for k, v in start.items() if k != "loss"})
        return logs


make_train_function = factory(train_class=MetricsAtStart)
