"""Hessian-vector product off by a factor 2 (a 0.5 from a 'half squared error' left in)."""


from ._base import factory


class HalfHvp:  # over the NumPy API: put on top of any backend\'s objective
    def hessp(self, x, p):
        return 0.5 * super().hessp(x, p)


make_train_function = factory(HalfHvp)
