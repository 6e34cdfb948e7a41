"""The value scipy sees equals Keras's own full-batch loss (model.evaluate in one batch)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import full_batch_loss, regression, small_mlp

from keras_opt_ref import FlatVariables, TensorFlowObjective, scipy_optimizer


def _objective_loss_matches(model, x, y=None, sw=None, **kwargs):
    obj = TensorFlowObjective(model, x, y, sw, **kwargs)
    x0 = obj.flat.read()
    got = obj.value(x0)
    want = full_batch_loss(model, x, y, sw)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg="objective != model.evaluate(batch_size=N)")
    return obj


def test_value_equals_evaluate_plain(keras):
    X, y = regression()
    model = small_mlp(keras)
    model.compile(loss="mse")
    _objective_loss_matches(model, X, y)


def test_value_with_sample_weights_and_regularization(keras):
    X, y = regression()
    sw = np.random.default_rng(3).uniform(0.1, 3.0, size=len(X))
    model = small_mlp(keras, l2=0.05)
    model.compile(loss="mse")
    obj = _objective_loss_matches(model, X, y, sw)
    # The regularization term is really in there: dropping it changes the value.
    unregularized = small_mlp(keras)
    unregularized.compile(loss="mse")
    unregularized.set_weights(model.get_weights())
    assert full_batch_loss(unregularized, X, y, sw) < obj.value(obj.flat.read()) - 1e-3


def test_value_multi_input_multi_output(keras):
    rng = np.random.default_rng(1)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    out1 = keras.layers.Dense(1, name="out1")(h)
    out2 = keras.layers.Dense(2, name="out2", kernel_regularizer=keras.regularizers.L2(0.01))(h)
    model = keras.Model([a, b], [out1, out2])
    model.compile(loss=["mse", "mae"], loss_weights=[1.0, 0.5])
    xa, xb = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    y1, y2 = rng.normal(size=(40, 1)), rng.normal(size=(40, 2))
    _objective_loss_matches(model, [xa, xb], [y1, y2])


REDUCTIONS = ["sum_over_batch_size", "sum", "mean_with_sample_weight"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [7, 10, 1000])
def test_chunked_equals_single_batch(keras, float64, chunk_size, reduction):
    """Chunks inside the graph (with and without a remainder) reproduce the one-batch value, gradient
    and HVP for every reduction Keras offers, the L2 term counted once, without falling back to one piece."""
    if reduction == "mean_with_sample_weight" and keras.__name__ == "tf_keras":
        pytest.skip("a Keras 3 reduction")
    X, y = regression(n=50)
    sw = np.random.default_rng(2).uniform(0.5, 2.0, size=50)
    model = small_mlp(keras, l2=0.01)
    model.compile(loss=keras.losses.MeanSquaredError(reduction=reduction))
    whole = TensorFlowObjective(model, X, y, sw, chunk_size=10**6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to one piece
        chunked = TensorFlowObjective(model, X, y, sw, chunk_size=chunk_size)
    x0 = whole.flat.read()
    np.testing.assert_allclose(whole.value(x0), full_batch_loss(model, X, y, sw), rtol=1e-6)
    f1, g1 = whole.value_and_grad(x0)
    f2, g2 = chunked.value_and_grad(x0)
    np.testing.assert_allclose(f2, f1, rtol=1e-12)
    np.testing.assert_allclose(g2, g1, rtol=1e-10, atol=1e-13)
    p = np.random.default_rng(0).normal(size=x0.size)
    np.testing.assert_allclose(chunked.hessp(x0, p), whole.hessp(x0, p), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(chunked.value(x0 + 0.1), whole.value(x0 + 0.1), rtol=1e-12)


def test_evaluations_do_not_retrace(keras):
    X, y = regression()
    model = small_mlp(keras)
    model.compile(loss="mse")
    obj = TensorFlowObjective(model, X, y, chunk_size=16)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=obj.size)
        obj.value_and_grad(x)
        obj.value(x + 1)
        obj.hessp(x, rng.normal(size=obj.size))
    assert obj.traces == {"value": 1, "value_and_grad": 1, "hvp": 1, "hessian": 0, "steihaug": 0}, obj.traces
    obj.set_data(X * 2, y)  # a new epoch's data of the same shapes reuses the graphs
    obj.value_and_grad(rng.normal(size=obj.size))
    assert obj.traces["value_and_grad"] == 1


def test_repeatable(keras):
    X, y = regression()
    model = small_mlp(keras)
    model.compile(loss="mse")
    obj = TensorFlowObjective(model, X, y)
    x = np.random.default_rng(0).normal(size=obj.size)
    f1, g1 = obj.value_and_grad(x)
    obj.value_and_grad(x + 1)
    f2, g2 = obj.value_and_grad(x.copy())
    assert f1 == f2 and np.array_equal(g1, g2)


def _fit_objective_value(keras, model, fit_x, fit_kwargs, X, y):
    """Run fit with zero iterations through the train function and compare its loss to evaluate."""
    model.compile(loss="mse")
    tf_ = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=1)
    model.train_function = tf_
    w0 = FlatVariables.from_variables(model.trainable_variables).read()
    model.fit(fit_x, verbose=0, **fit_kwargs)
    obj = tf_.objective
    assert obj.num_samples == len(X), "the train function did not see the whole training set"
    np.testing.assert_allclose(obj.value(w0), _evaluate_at(model, w0, X, y), rtol=1e-6)


def _evaluate_at(model, w, X, y):
    FlatVariables.from_variables(model.trainable_variables).write(w)
    return full_batch_loss(model, X, y)


def test_uneven_batches_through_fit(keras):
    """50 samples at batch_size=16: the objective is the full-batch loss, not a mean of batch means."""
    X, y = regression(n=50)
    model = small_mlp(keras)
    _fit_objective_value(keras, model, X, dict(y=y, batch_size=16), X, y)


def test_tf_data_source(keras):
    X, y = regression(n=50)
    ds = tf.data.Dataset.from_tensor_slices((X, y)).batch(16)
    _fit_objective_value(keras, small_mlp(keras), ds, {}, X, y)


def test_generator_source(keras):
    X, y = regression(n=50)

    def batches():
        for start in range(0, 50, 16):
            yield X[start : start + 16], y[start : start + 16]

    _fit_objective_value(keras, small_mlp(keras), batches(), {}, X, y)


def _batches(keras, X, y, batch_size):
    """A Keras 3 PyDataset (tf-keras: Sequence) over arrays, the last batch short."""
    base = getattr(keras.utils, "PyDataset", None) or keras.utils.Sequence

    class Batches(base):
        def __len__(self):
            return -(-len(X) // batch_size)

        def __getitem__(self, i):
            return X[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]

    return Batches()


def test_sequence_source(keras):
    X, y = regression(n=50)
    _fit_objective_value(keras, small_mlp(keras), _batches(keras, X, y, 16), {}, X, y)


def test_sample_weights_through_fit(keras):
    X, y = regression(n=50)
    sw = np.random.default_rng(5).uniform(0.1, 2.0, size=50)
    model = small_mlp(keras)
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=5)
    history = model.fit(X, y, sample_weight=sw, batch_size=16, verbose=0)
    want = float(model.evaluate(X, y, sample_weight=sw, batch_size=50, verbose=0))
    np.testing.assert_allclose(history.history["loss"][-1], want, rtol=1e-6)


@pytest.mark.parametrize("source", ["arrays", "tf.data", "sequence", "steps_per_epoch"])
def test_every_epoch_sees_the_whole_training_set_once(keras, source):
    """tf-keras feeds arrays from one iterator over a repeated dataset: epochs must not blur."""
    X, y = regression(n=50)
    fit_args = {
        "arrays": ((X, y), dict(batch_size=16)),
        "tf.data": ((tf.data.Dataset.from_tensor_slices((X, y)).batch(16),), {}),
        "sequence": ((_batches(keras, X, y, 16),), {}),
        "steps_per_epoch": ((tf.data.Dataset.from_tensor_slices((X, y)).batch(10).repeat(),), dict(steps_per_epoch=5)),
    }[source]
    model = small_mlp(keras)
    model.compile(loss="mse")
    train = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=3)
    seen = []
    original = train.run

    def recording_run(x, y=None, sample_weight=None):
        seen.append(np.sort(np.asarray(x, dtype=np.float32)[:, 0]))
        return original(x, y, sample_weight)

    train.run = recording_run
    model.train_function = train
    history = model.fit(*fit_args[0], epochs=3, verbose=0, **fit_args[1])
    assert len(seen) == 3, f"{len(seen)} optimizations for 3 epochs"
    assert len(history.history["loss"]) == 3
    for samples in seen:
        np.testing.assert_array_equal(
            samples, np.sort(X[:, 0].astype(np.float32)), err_msg="an epoch's objective must cover each sample once"
        )


def _model_xla_cannot_compile(keras):
    class StringRoundTrip(keras.layers.Layer):
        """Adds zero through string ops, which XLA does not support."""

        def call(self, x):
            lengths = tf.cast(tf.strings.length(tf.strings.as_string(x)), x.dtype)
            return x + 0.0 * tf.stop_gradient(lengths)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), StringRoundTrip(), keras.layers.Dense(1)])
    model.compile(loss="mse")
    return model


def test_xla_is_the_default_and_falls_back_with_a_warning(keras):
    X, y = regression()
    plain = small_mlp(keras)
    plain.compile(loss="mse")
    assert TensorFlowObjective(plain, X, y).jit_compile is True
    model = _model_xla_cannot_compile(keras)
    obj = TensorFlowObjective(model, X, y)
    x0 = obj.flat.read()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f, g = obj.value_and_grad(x0)
    assert any("XLA could not compile" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert obj.jit_compile is False
    assert f == pytest.approx(full_batch_loss(model, X, y), rel=1e-6)
    assert np.all(np.isfinite(g)) and np.any(g != 0)
    plain_tf = TensorFlowObjective(model, X, y, jit_compile=False)
    np.testing.assert_allclose(obj.hessp(x0, g), plain_tf.hessp(x0, g), rtol=1e-5, atol=1e-6)


def test_xla_insisted_on_raises(keras):
    X, y = regression()
    obj = TensorFlowObjective(_model_xla_cannot_compile(keras), X, y, jit_compile=True)
    with pytest.raises(tf.errors.OpError):
        obj.value(obj.flat.read())


def test_new_data_shapes_rebuild_the_graphs(keras):
    X, y = regression()
    model = small_mlp(keras)
    model.compile(loss="mse")
    obj = TensorFlowObjective(model, X, y, chunk_size=16)
    x0 = obj.flat.read()
    obj.value(x0)
    obj.set_data(X[:21], y[:21])
    assert obj.num_samples == 21
    assert obj.value(x0) == pytest.approx(full_batch_loss(model, X[:21], y[:21]), rel=1e-6)


def test_many_objectives_in_one_process_trace_without_tensorflows_retracing_warning(keras):
    """A hyperparameter search builds an objective per model: each traces its data check once per
    chunk shape, which is not retracing, and TensorFlow must not say it is."""
    import logging

    X, y = regression()
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for _ in range(8):
            model = small_mlp(keras)
            model.compile(loss="mse")
            TensorFlowObjective(model, X, y, chunk_size=20)  # two chunk shapes: 20 rows and the 10-row tail
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if "retracing" in m], messages
