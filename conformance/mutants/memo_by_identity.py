"""The memo is keyed by the array object (``id(x)``), not by a copy of its values: an array that scipy
changes in place, or a new array at a recycled address, gets the old point's value."""


from ._base import factory


class IdentityMemo:  # over the NumPy API: put on top of any backend\'s objective
    _memo_id = None

    def _memo_hit(self, x):
        return self._memo_x is not None and id(x) == self._memo_id

    def _remember(self, x, f, g):
        super()._remember(x, f, g)
        self._memo_id = id(x)


make_train_function = factory(IdentityMemo)
