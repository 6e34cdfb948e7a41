"""Hessian-vector products computed and returned in float32 on a float64 model."""

import numpy as np

from ._base import factory


class Float32Hvp:  # over the NumPy API: put on top of any backend\'s objective
    def hessp(self, x, p):
        x32, p32 = np.float32(x).astype(np.float64), np.float32(p).astype(np.float64)
        return super().hessp(x32, p32).astype(np.float32).astype(np.float64)


make_train_function = factory(Float32Hvp)
