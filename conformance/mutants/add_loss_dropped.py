"""add_loss terms left out: compiled loss plus weight regularizers only (as a hand-built loss would be)."""

import tensorflow as tf

from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective
from keras_opt_ref.base import keras_compat as _keras

from ._base import factory


class NoAddLoss(TensorFlowObjective):
    def _loss(self, batch):
        total = super()._loss(batch)
        extra = [tf.cast(loss, tf.float64) for loss in self.model.losses]
        if not extra:
            return total
        regularizers, _ = _keras.variable_regularizers(self.model)
        kept = [
            tf.cast(regularizers[id(v)](v), tf.float64) for v in self.model.trainable_variables if id(v) in regularizers
        ]
        return total - tf.add_n(extra) + (tf.add_n(kept) if kept else 0.0)


make_train_function = factory(NoAddLoss)
