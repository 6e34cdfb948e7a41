"""1. Objective: the value scipy sees is Keras's full-batch loss at the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from .problems import fit, mlp, regression
from .truth import keras_loss_at, trainable_vector

RTOL = 1e-5  # float32 models: sums of 50 terms in a different order agree to ~1e-6


def _sequence(keras, X, y, batch):
    base = getattr(keras.utils, "PyDataset", None) or keras.utils.Sequence

    class Batches(base):
        def __len__(self):
            return -(-len(X) // batch)

        def __getitem__(self, i):
            return X[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]

    return Batches()


def _check(observe, model, w_start, X, y, sw=None):
    call = observe.calls[0]
    np.testing.assert_array_equal(
        call.x0, w_start, err_msg="x0 handed to scipy is not the model's trainable weights in layout order"
    )
    rng = np.random.default_rng(0)
    for w in (w_start, w_start + 0.1 * rng.normal(size=w_start.size)):
        got = call.value(w)
        want = keras_loss_at(model, w, X, y, sw)
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg="scipy's f(x) != model.evaluate(batch_size=N) at x")


@pytest.mark.parametrize("source", ["arrays-uneven-batches", "tf.data", "pydataset"])
def test_full_batch_loss_for_data_source(impl, observe, keras, source):
    X, y = regression(n=50)
    model = mlp(keras)
    model.compile(loss="mse")
    w = trainable_vector(model)
    data = {
        "arrays-uneven-batches": ((X, y), dict(batch_size=16)),
        "tf.data": ((tf.data.Dataset.from_tensor_slices((X, y)).batch(16),), {}),
        "pydataset": ((_sequence(keras, X, y, 16),), {}),
    }[source]
    fit(impl, model, *data[0], **data[1])
    _check(observe, model, w, X, y)


def test_sample_weights(impl, observe, keras):
    X, y = regression(n=50)
    sw = np.random.default_rng(3).uniform(0.1, 3.0, size=50)
    model = mlp(keras)
    model.compile(loss="mse")
    w = trainable_vector(model)
    fit(impl, model, X, y, sample_weight=sw, batch_size=16)
    _check(observe, model, w, X, y, sw)


def test_regularization_losses(impl, observe, keras):
    X, y = regression(n=50)
    model = mlp(keras, l2=0.1)
    model.compile(loss="mse")
    w = trainable_vector(model)
    fit(impl, model, X, y, batch_size=16)
    _check(observe, model, w, X, y)


def test_multi_input_multi_output(impl, observe, keras):
    rng = np.random.default_rng(1)
    a, b = keras.Input((3,)), keras.Input((2,))
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], [keras.layers.Dense(1)(h), keras.layers.Dense(2)(h)])
    model.compile(loss=["mse", "mae"], loss_weights=[1.0, 0.5])
    X = [rng.normal(size=(40, 3)), rng.normal(size=(40, 2))]
    Y = [rng.normal(size=(40, 1)), rng.normal(size=(40, 2))]
    w = trainable_vector(model)
    fit(impl, model, X, Y, batch_size=16)
    _check(observe, model, w, X, Y)


def test_repeatable(impl, observe, keras):
    X, y = regression(n=50)
    model = mlp(keras)
    model.compile(loss="mse")
    fit(impl, model, X, y, batch_size=16)
    call = observe.last
    w = call.x0 + 0.05
    first = call.value(w)
    call.value(w + 1.0)
    assert call.value(w) == first, "two evaluations at the same x differ"
