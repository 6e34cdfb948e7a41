"""One scipy run per train_function call, on that call's batches (steps_per_execution of them), instead of
one run per epoch on all of them."""

from keras_opt_ref import _keras
from keras_opt_ref.scipy_optimizer import ScipyTrainFunction, _concatenate, _take

from ._base import factory


class EveryCall(ScipyTrainFunction):
    def __call__(self, iterator):
        batches = _take(iterator, _keras.steps_per_execution(self.model), self.max_data_bytes)
        data = _concatenate([_keras.unpack_x_y_sample_weight(self.model, b) for b in batches])
        return self.run(*data)


make_train_function = factory(train_class=EveryCall)
