"""Conformance suite for implementations of the keras-opt interface.

An implementation is a module with ``make_train_function(model, **kwargs)`` whose result is
assigned to ``model.train_function`` and drives ``scipy.optimize``. Name it with
``pytest --pyargs keras_opt_ref_conformance --impl MODULE`` (or ``KERAS_OPT_IMPL``).

Expected values never come from the implementation or from keras_opt_ref's internals:
they come from ``model.evaluate``, float64 finite differences, dense matrices built here,
and numpy least squares. The callables an implementation hands to scipy are observed by
wrapping ``scipy.optimize.minimize`` / ``least_squares`` while a test runs.
"""
