"""hess/hessp never handed to scipy (jaxopt's scipy wrapper has this as a TODO)."""

import dataclasses

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class NoHessian(ScipyTrainFunction):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = dataclasses.replace(self.method, hess=None)


make_train_function = factory(train_class=NoHessian)
