"""5. Bad input: an exception with a message -- no crash, hang or silent wrong result."""

from __future__ import annotations

import numpy as np
import pytest

from .problems import fit, mlp, regression


def _expect_refusal(run, model):
    with pytest.raises(Exception) as err:  # noqa: B017 -- any exception type, but it must explain itself
        run()
    assert len(str(err.value)) > 20, f"{type(err.value).__name__} without a useful message: {err.value!r}"
    for w in model.get_weights():
        assert np.all(np.isfinite(w)), "weights not finite after a refused fit"
    return str(err.value)


def test_not_compiled(impl, keras):
    model = mlp(keras)
    X, y = regression()
    _expect_refusal(lambda: fit(impl, model, X, y), model)


def test_unknown_method(impl, keras):
    model = mlp(keras)
    model.compile(loss="mse")
    X, y = regression()
    message = _expect_refusal(lambda: fit(impl, model, X, y, method="no-such-method"), model)
    assert "L-BFGS-B" in message, "the message should list the valid methods"


@pytest.mark.parametrize("where", ["inputs", "targets", "sample weights"])
def test_non_finite_data(impl, keras, where):
    X, y = regression(n=20)
    sw = np.ones(20)
    {"inputs": X, "targets": y, "sample weights": sw}[where][2] = np.inf
    model = mlp(keras)
    model.compile(loss="mse")
    _expect_refusal(lambda: fit(impl, model, X, y, sample_weight=sw), model)


def test_empty_data(impl, keras):
    model = mlp(keras)
    model.compile(loss="mse")
    _expect_refusal(lambda: fit(impl, model, np.zeros((0, 3)), np.zeros((0, 1))), model)


def test_stochastic_layer(impl, keras):
    layers = keras.layers
    model = keras.Sequential([keras.Input((3,)), layers.Dense(4), layers.Dropout(0.5), layers.Dense(1)])
    model.compile(loss="mse")
    X, y = regression()
    _expect_refusal(lambda: fit(impl, model, X, y), model)


def test_low_precision(impl, keras):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, dtype="mixed_float16")])
    model.compile(loss="mse")
    X, y = regression()
    _expect_refusal(lambda: fit(impl, model, X, y), model)


def test_bounds_for_unbounded_method(impl, keras):
    model = mlp(keras)
    model.compile(loss="mse")
    X, y = regression()
    _expect_refusal(lambda: fit(impl, model, X, y, method="CG", make_kwargs=dict(bounds=(0, 1))), model)


def test_embedding_index_out_of_range(impl, keras):
    """Keras raises on an id >= input_dim; XLA would silently clamp it. Either way: refuse."""
    model = keras.Sequential(
        [keras.Input((1,), dtype="int32"), keras.layers.Embedding(5, 2), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    model.compile(loss="mse")
    ids = np.array([[0], [4], [7], [1]], dtype="int32")
    _expect_refusal(lambda: fit(impl, model, ids, np.ones((4, 1)), batch_size=4), model)
