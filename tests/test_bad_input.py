"""Bad input raises before any work, naming problem and fix; failures keep the best point."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
from conftest import assert_left_at_a_finite_better_point, full_batch_loss, regression, small_mlp

from keras_opt_ref import FullBatchObjective, HessianTooLargeError, scipy_optimizer


@pytest.fixture
def no_scipy(monkeypatch):
    """Fails the test if any optimization work starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("scipy.optimize.minimize was called despite bad input")

    monkeypatch.setattr(scipy.optimize, "minimize", refuse)


def _compiled(keras, **kwargs):
    model = small_mlp(keras, **kwargs)
    model.compile(loss="mse")
    return model


def test_not_compiled(keras):
    with pytest.raises(RuntimeError, match=r"not compiled.*model\.compile"):
        scipy_optimizer.make_train_function(small_mlp(keras))


def test_no_trainable_weights(keras, no_scipy):
    model = _compiled(keras)
    model.trainable = False
    model.compile(loss="mse")
    with pytest.raises(ValueError, match="no trainable weights"):
        scipy_optimizer.make_train_function(model)


def test_unknown_method_lists_valid_ones(keras):
    with pytest.raises(ValueError, match=r"Unknown method 'lbfgs'.*L-BFGS-B.*trust-krylov"):
        scipy_optimizer.make_train_function(_compiled(keras), method="lbfgs")


@pytest.mark.parametrize("where", ["inputs", "targets", "sample weights"])
def test_non_finite_data_named(keras, where, no_scipy):
    X, y = regression(n=20)
    sw = np.ones(20)
    {"inputs": X, "targets": y, "sample weights": sw}[where][3] = np.nan
    model = _compiled(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B")
    with pytest.raises(ValueError, match=f"The {where}.*NaN/Inf"):
        model.fit(X, y, sample_weight=sw, verbose=0)
    assert np.all([np.all(np.isfinite(w)) for w in model.get_weights()])


def test_stochastic_layers_refused_or_explicitly_deterministic(keras):
    layers = keras.layers
    model = keras.Sequential([keras.Input((3,)), layers.Dense(4), layers.Dropout(0.3), layers.Dense(1)])
    model.compile(loss="mse")
    with pytest.raises(ValueError, match=r"stochastic layers.*deterministic=True"):
        scipy_optimizer.make_train_function(model)
    X, y = regression(n=20)
    obj = FullBatchObjective(model, X, y, deterministic=True)
    x0 = obj.flat.read()
    assert obj.value(x0) == obj.value(x0 + 0.0)
    np.testing.assert_allclose(obj.value(x0), full_batch_loss(model, X, y), rtol=1e-6)


def test_low_precision_refused(keras):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, dtype="mixed_float16")])
    model.compile(loss="mse")
    with pytest.raises(TypeError, match="float16"):
        scipy_optimizer.make_train_function(model)


def test_empty_data(keras, no_scipy):
    model = _compiled(keras)
    with pytest.raises(ValueError, match="empty"):
        FullBatchObjective(model, np.zeros((0, 3)), np.zeros((0, 1)))


def test_bounds_with_unbounded_method(keras):
    with pytest.raises(ValueError, match=r"ignores bounds.*L-BFGS-B"):
        scipy_optimizer.make_train_function(_compiled(keras), method="CG", bounds=(0, 1))


def test_dense_hessian_too_large_before_work(keras, no_scipy):
    model = _compiled(keras, hidden=30)
    with pytest.raises(HessianTooLargeError, match=r"151 weights.*GiB.*trust-ncg"):
        scipy_optimizer.make_train_function(model, method="trust-exact", max_hessian_params=100)


def test_mismatched_sample_counts(keras):
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        FullBatchObjective(_compiled(keras), np.zeros((5, 3)), np.zeros((4, 1)))


class _Sabotage:
    """Wraps value_and_grad: after `after` good calls, return NaN or raise."""

    def __init__(self, monkeypatch, after, failure):
        self.calls = 0
        real = FullBatchObjective.value_and_grad

        def wrapped(obj, x):
            self.calls += 1
            if self.calls > after:
                if failure == "nan":
                    return math.nan, np.full(x.shape, math.nan)
                raise failure
            return real(obj, x)

        monkeypatch.setattr(FullBatchObjective, "value_and_grad", wrapped)


@pytest.mark.parametrize(
    "failure", ["nan", KeyboardInterrupt(), RuntimeError("boom")], ids=["nan", "interrupt", "error"]
)
def test_failure_leaves_best_point(keras, monkeypatch, failure):
    X, y = regression(n=30)
    model = _compiled(keras)
    start = full_batch_loss(model, X, y)
    train = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=50)
    model.train_function = train
    _Sabotage(monkeypatch, after=6, failure=failure)
    if failure == "nan":
        model.fit(X, y, verbose=0)
    else:
        with pytest.raises(type(failure)):
            model.fit(X, y, verbose=0)
    result = train.result
    assert_left_at_a_finite_better_point(train, model, X, y, start)
    np.testing.assert_allclose(result.fun, train.objective.best_value, rtol=0)
    if failure != "nan":
        assert type(failure).__name__ in result.message and not result.success


def test_embedding_index_out_of_range_refused_before_work(keras, no_scipy):
    """Under XLA an out-of-range gather is clamped, not an error: the data must be checked first."""
    model = keras.Sequential(
        [keras.Input((1,), dtype="int32"), keras.layers.Embedding(5, 2), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    model.compile(loss="mse")
    before = [w.copy() for w in model.get_weights()]
    ids = np.array([[0], [4], [7]], dtype="int32")
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B")
    with pytest.raises(ValueError, match="cannot evaluate its training data.*index ranges"):
        model.fit(ids, np.ones((3, 1)), verbose=0)
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
