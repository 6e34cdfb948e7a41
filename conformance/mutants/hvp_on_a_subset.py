"""Hessian-vector products on the first chunk of the data only (a "subsampled" Hessian passed off as exact)."""

import tensorflow as tf

from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective

from ._base import factory


class FirstChunkHvp(TensorFlowObjective):
    def __init__(self, *args, **kwargs):
        kwargs["chunk_size"] = 16
        super().__init__(*args, **kwargs)

    def _hvp_at_current_weights(self, p):
        head, tail = self._chunks
        if head is None:
            return super()._hvp_at_current_weights(p)
        first = tf.nest.map_structure(lambda v: None if v is None else tf.gather(v, 0), head)
        return self._chunk_hvp(first, 1.0, p)


make_train_function = factory(FirstChunkHvp)
