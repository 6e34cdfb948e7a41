"""One scipy run per train_function call, on that call's batches (steps_per_execution of them), instead of
one run per epoch on all of them."""

from keras_opt_ref.base import keras_compat
from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class EveryCall(ScipyTrainFunction):
    def epoch(self, iterator):  # each of fit's calls (TF: iterator; JAX: state, iterator) runs scipy
        count = keras_compat.steps_per_execution(self.model)
        return self.optimize(self._protocol.drain(iterator, count, self.max_data_bytes, self.model))


make_train_function = factory(train_class=EveryCall)
