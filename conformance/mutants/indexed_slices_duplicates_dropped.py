"""Embedding gradients densified by scatter-update: repeated indices overwrite instead of summing."""

import tensorflow as tf

from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective

from ._base import factory


class LastWriteWins(TensorFlowObjective):
    def _chunk_value_and_grad(self, chunk, weight):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._tf_vars)
            loss = weight * self._loss(chunk)
        grads = tape.gradient(loss, self._tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        dense = []
        for g, v in zip(grads, self._tf_vars, strict=True):
            if isinstance(g, tf.IndexedSlices):
                g = tf.tensor_scatter_nd_update(tf.zeros_like(v), tf.expand_dims(g.indices, 1), g.values)
            dense.append(g)
        return loss, self.flat.concat(dense)


make_train_function = factory(LastWriteWins)
