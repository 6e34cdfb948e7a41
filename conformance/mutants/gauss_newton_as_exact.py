"""The Gauss-Newton matrix 2 J^T J handed to scipy as the exact Hessian (wrong on non-convex models)."""

from keras_opt_ref.scipy_optimizer import ScipyTrainFunction

from ._base import factory

_TAKES_A_HESSIAN = {"newton-cg", "trust-ncg", "trust-krylov", "trust-constr", "trust-exact", "dogleg"}


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    if str(method).lower() in _TAKES_A_HESSIAN:
        options.setdefault("hessian", "gauss-newton")
    return factory(train_class=ScipyTrainFunction)(model, method, maxiter, verbose, **options)
