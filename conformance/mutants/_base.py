"""Builds a mutant from the reference: swap the objective class or the train-function class."""

from __future__ import annotations

from keras_opt_ref.objective import FullBatchObjective
from keras_opt_ref.scipy_optimizer import ScipyTrainFunction


def factory(objective_class=FullBatchObjective, train_class=ScipyTrainFunction):
    class Mutant(train_class):
        pass

    Mutant.objective_class = objective_class

    def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
        return Mutant(model, method, maxiter, verbose, **options)

    return make_train_function
