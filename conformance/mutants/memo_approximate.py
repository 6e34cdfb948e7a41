"""The memo treats nearby points as equal (``np.allclose``): f and g at x' come from x."""

import numpy as np

from ._base import factory


class ApproximateMemo:  # over the NumPy API: put on top of any backend\'s objective
    def _memo_hit(self, x):
        return self._memo_x is not None and np.allclose(x, self._memo_x)


make_train_function = factory(ApproximateMemo)
