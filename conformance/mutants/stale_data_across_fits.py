"""State carried across fits: the data drained by the first fit is kept; later fits optimize it again."""

from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective

from ._base import factory


class FirstDataForever(TensorFlowObjective):
    def set_data(self, x, y=None, sample_weight=None):
        if getattr(self, "_chunks", None) is None:
            super().set_data(x, y, sample_weight)


make_train_function = factory(FirstDataForever)
