"""Sample weights dropped on the way to the loss."""

from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective

from ._base import factory


class NoSampleWeights(TensorFlowObjective):
    def _loss(self, batch):
        x, y, _ = batch
        return super()._loss((x, y, None))


make_train_function = factory(NoSampleWeights)
