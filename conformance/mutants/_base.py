"""Builds a mutant from the reference: swap the objective class or the train-function class."""

from __future__ import annotations

from keras_opt_ref import backends
from keras_opt_ref.base.objective import Objective
from keras_opt_ref.scipy_optimizer import ScipyTrainFunction


def factory(objective_class=None, train_class=ScipyTrainFunction):
    """``objective_class``: a subclass of a backend's objective (a mutant of its internals, for that
    backend only), or a plain mixin over the NumPy API (``value_and_grad``, ``hessp``, the memo), which
    goes on top of the model's own backend objective, so the mutant runs on every backend."""

    class Mutant(train_class):
        def _objective_for(self, *data):
            if self.objective is None and objective_class is not None and not issubclass(objective_class,
                                                                                           Objective):
                base = backends.objective_class(self.model)
                self.objective_class = type(objective_class.__name__, (objective_class, base), {})
            return super()._objective_for(*data)

    if objective_class is not None and issubclass(objective_class, Objective):
        Mutant.objective_class = objective_class

    def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
        return Mutant(model, method, maxiter, verbose, **options)

    return make_train_function
