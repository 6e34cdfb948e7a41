"""The objective runs the model in training mode (model(x, training=True)), unlike model.evaluate."""

import tensorflow as tf

from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective

from ._base import factory


class TrainingMode(TensorFlowObjective):
    def _loss(self, batch):
        x, y, sample_weight = batch
        y_pred = self.model(x, training=True)
        return tf.cast(self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight), tf.float64)


make_train_function = factory(TrainingMode)
