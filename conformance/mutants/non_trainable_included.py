"""Non-trainable weights (frozen layers, statistics) included in the optimized vector."""

from keras_opt_ref import _keras
from keras_opt_ref.flat import FlatVariables
from keras_opt_ref.objective import FullBatchObjective

from ._base import factory


class AllWeights(FullBatchObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model
        self.flat = FlatVariables.from_variables(list(model.trainable_variables) + list(model.non_trainable_variables))
        self._tf_vars = [_keras.tf_variable(v) for v in self.flat.variables]


make_train_function = factory(AllWeights)
