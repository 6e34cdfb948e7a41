"""Shared fixtures. The Keras flavour comes from TF_USE_LEGACY_KERAS, as in TensorFlow."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_opt_ref import _keras  # noqa: E402

KERAS = _keras.default_keras()


def pytest_report_header(config):
    return f"keras flavour: {KERAS.__name__} {KERAS.__version__}; tensorflow {tf.__version__}"


@pytest.fixture
def keras():
    return KERAS


@pytest.fixture(autouse=True)
def _seeded():
    KERAS.utils.set_random_seed(1234)
    yield
    KERAS.backend.clear_session()


@pytest.fixture
def float64():
    """Build models in float64 so finite differences can be compared at ~1e-7."""
    old = KERAS.backend.floatx()
    KERAS.backend.set_floatx("float64")
    yield
    KERAS.backend.set_floatx(old)


def full_batch_loss(model, x, y=None, sample_weight=None) -> float:
    """Keras's own loss over the whole data set in one batch: the ground truth."""
    n = len(tf.nest.flatten(x)[0])
    out = model.evaluate(x, y, sample_weight=sample_weight, batch_size=n, verbose=0)
    return float(out[0] if isinstance(out, (list, tuple)) else out)


def assert_left_at_a_finite_better_point(train, model, x, y, start: float) -> None:
    """After a failed or interrupted run: finite weights, equal to result.x, below the start,
    and the loss reported is Keras's loss there."""
    result = train.result
    weights = train.objective.flat.read()
    assert np.all(np.isfinite(weights)), "model left at garbage"
    np.testing.assert_array_equal(weights, result.x)
    assert np.isfinite(result.fun) and result.fun < start, (result.fun, start)
    np.testing.assert_allclose(full_batch_loss(model, x, y), result.fun, rtol=1e-6)


def central_differences(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar or vector function, one coordinate at a time."""
    columns = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        columns.append((np.asarray(f(x + e)) - np.asarray(f(x - e))) / (2 * h))
    return np.stack(columns, axis=-1)


def directional_difference(f, x: np.ndarray, p: np.ndarray, h: float = 1e-5) -> np.ndarray:
    return (np.asarray(f(x + h * p)) - np.asarray(f(x - h * p))) / (2 * h)


def small_mlp(keras, n_features=3, hidden=5, l2=0.0, dtype=None):
    reg = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential(
        [
            keras.Input((n_features,), dtype=dtype),
            keras.layers.Dense(hidden, activation="tanh", kernel_regularizer=reg, dtype=dtype),
            keras.layers.Dense(1, dtype=dtype),
        ]
    )


def regression(n=50, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.sin(X @ rng.normal(size=(d, 1))) + 0.1 * rng.normal(size=(n, 1))
    return X, y
