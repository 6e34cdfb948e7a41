"""The keras-opt fork's bug: hessp(x, p) uses whatever weights the last evaluation left."""

import numpy as np

from ._base import factory


class StaleHessp:  # over the NumPy API: put on top of any backend\'s objective
    def hessp(self, x, p):
        last = self._memo_x if self._memo_x is not None else np.asarray(x)
        return super().hessp(last, p)


make_train_function = factory(StaleHessp)
