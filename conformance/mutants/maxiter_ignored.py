"""maxiter accepted and then never handed to scipy (its default limit applies)."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory


class NoMaxiter(ScipyTrainFunction):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key in ("maxiter", "maxfun", "max_nfev"):
            self.options.pop(key, None)


make_train_function = factory(train_class=NoMaxiter)
