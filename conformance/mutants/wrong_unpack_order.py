"""The flat vector laid out in another order than model.trainable_variables (reversed)."""

from keras_opt_ref import _keras
from keras_opt_ref.flat import FlatVariables
from keras_opt_ref.objective import FullBatchObjective

from ._base import factory


class Reversed(FullBatchObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flat = FlatVariables.from_variables(list(reversed(self.model.trainable_variables)))
        self._tf_vars = [_keras.tf_variable(v) for v in self.flat.variables]


make_train_function = factory(Reversed)
