"""One scipy run per train_function call, on that call's batches (steps_per_execution of them), instead of
one run per epoch on all of them."""

from keras_opt_ref import _keras
from keras_opt_ref.scipy_optimizer import ScipyTrainFunction, _take

from ._base import factory


class EveryCall(ScipyTrainFunction):
    def _epoch(self, iterator):  # each of fit's calls (TF: iterator; JAX: state, iterator) runs scipy
        batches = _take(iterator, _keras.steps_per_execution(self.model), self.max_data_bytes)
        return self._optimize(batches if self.backend == "tensorflow" else _keras.numpy_batches(batches))


make_train_function = factory(train_class=EveryCall)
