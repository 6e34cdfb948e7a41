"""Non-trainable weights (frozen layers, statistics) included in the optimized vector."""

from keras_opt_ref.backends.tensorflow.flat import GraphFlatVariables as FlatVariables
from keras_opt_ref.backends.tensorflow.flat import tf_variable
from keras_opt_ref.backends.tensorflow.objective import TensorFlowObjective

from ._base import factory


class AllWeights(TensorFlowObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model
        self.flat = FlatVariables.from_variables(list(model.trainable_variables) + list(model.non_trainable_variables))
        self._tf_vars = [tf_variable(v) for v in self.flat.variables]


make_train_function = factory(AllWeights)
