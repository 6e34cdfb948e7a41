"""The flat vector laid out in another order than model.trainable_variables (reversed)."""

from keras_opt_ref.backends.tensorflow.flat import GraphFlatVariables as FlatVariables
from keras_opt_ref.backends.tensorflow.flat import tf_variable
from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective

from ._base import factory


class Reversed(TensorFlowObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flat = FlatVariables.from_variables(list(reversed(self.model.trainable_variables)))
        self._tf_vars = [tf_variable(v) for v in self.flat.variables]


make_train_function = factory(Reversed)
