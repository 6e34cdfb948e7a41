"""Hessian-vector product with the wrong sign (a mixed-up gradient of -g.p)."""

from keras_opt_ref.objective import FullBatchObjective

from ._base import factory


class NegatedHvp(FullBatchObjective):
    def hessp(self, x, p):
        return -super().hessp(x, p)


make_train_function = factory(NegatedHvp)
