"""loss_over_rows: a declared rule for a loss whose terms are unknown (an overridden compute_loss), measured.

Truth is the model's own compute_loss over all rows in one piece, called eagerly, and float64 central
differences of it. A declaration that adds up is chunked (no one-piece warning) and gives that value and
gradient; one that does not add up, or contradicts the compiled loss's reduction, is refused before any
evaluation, with a message naming the numbers and the fix.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from keras_opt_ref_conformance.truth import directional

from keras_opt_ref import backends, scipy_optimizer
from keras_opt_ref.base import checks


def _reduce(keras, kind, t):
    if hasattr(keras, "ops"):
        return getattr(keras.ops, kind)(t)
    import tensorflow as tf

    return {"mean": tf.reduce_mean, "sum": tf.reduce_sum}[kind](t)


def _cast64(keras, t):
    if hasattr(keras, "ops"):
        return keras.ops.cast(t, "float64")
    import tensorflow as tf

    return tf.cast(t, "float64")


def _custom(keras, kind, *, anchor=0.0, l2=0.0):
    """Squared errors reduced by ``kind`` over the rows, plus ``anchor`` times a term that does not depend on
    the data (the network's mean square at fixed points, as a PINN's boundary term), plus ``sum(self.losses)``
    (the weight regularizers) when ``l2``."""

    class Custom(keras.Model):
        def __init__(self):
            super().__init__(dtype="float64")  # else Keras 3 casts a subclass's inputs to float32 (JAX)
            reg = keras.regularizers.L2(l2) if l2 else None
            self.net = keras.Sequential([keras.Input((3,), dtype="float64"),
                                         keras.layers.Dense(4, activation="tanh", dtype="float64",
                                                            kernel_regularizer=reg),
                                         keras.layers.Dense(1, dtype="float64")])
            self.points = np.linspace(-1.0, 1.0, 6).reshape(2, 3)

        def call(self, x):
            return self.net(x)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
            y = _cast64(keras, y)  # fit hands y over in floatx
            loss = _reduce(keras, kind, (y_pred - y) ** 2)
            if anchor:
                loss = loss + anchor * _reduce(keras, "mean", self.net(self.points) ** 2)
            if l2:
                loss = loss + sum(self.losses)
            return loss

    keras.utils.set_random_seed(0)
    model = Custom()
    model(np.zeros((1, 3)))
    model.compile(loss="mse")
    return model


def _tolerances(objective):
    """(value rtol, difference step, gradient rtol): float64 on TensorFlow; Keras 3.15 computes tanh in float32
    on JAX and torch even for float64 models (docs/backends.md), so there the differences take a longer step."""
    return (1e-12, 1e-6, 1e-6) if objective.computes_float64 else (1e-6, 1e-3, 2e-3)


def _data(n=37):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3))
    return X, np.sin(X @ np.array([[1.0], [-0.5], [0.3]]))


def _truth(model, X, y):
    """The model's compute_loss over all rows in one piece, eagerly, as a function of the flat weights."""
    variables = model.trainable_variables

    def loss(w):
        start = 0
        for v in variables:
            size = int(np.prod(v.shape))
            v.assign(w[start:start + size].reshape(tuple(v.shape)))
            start += size
        return checks.loss_eagerly(model, (X, y, None), _to_backend(model))

    return loss


def _to_backend(model):
    import keras

    return keras.ops.convert_to_tensor if hasattr(model, "stateless_call") else np.asarray


@pytest.mark.parametrize("kind, anchor, l2", [("mean", 0.7, 0.0), ("sum", 0.0, 0.01), ("mean", 0.0, 0.01)])
def test_a_declaration_that_adds_up_is_chunked_and_exact(keras, kind, anchor, l2):
    X, y = _data()
    model = _custom(keras, kind, anchor=anchor, l2=l2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "evaluated in one piece" warning: it is chunked
        objective = backends.make_objective(model, X, y, chunk_size=8, loss_over_rows=kind)
    x0 = objective.flat.read()
    truth = _truth(model, X, y)
    rel, h, grad_rel = _tolerances(objective)
    rng = np.random.default_rng(1)
    for x in (x0, x0 + 0.3 * rng.normal(size=x0.size)):
        f, g = objective.value_and_grad(x)
        assert f == pytest.approx(truth(x), rel=rel)
        for _ in range(2):
            p = rng.normal(size=x.size)
            assert g @ p == pytest.approx(float(directional(truth, x, p, h=h)), rel=grad_rel)


def test_an_undeclared_custom_loss_goes_in_one_piece_and_the_warning_names_the_setting(keras):
    X, y = _data()
    model = _custom(keras, "mean", anchor=0.7)
    with pytest.warns(UserWarning, match="evaluated in one piece.*loss_over_rows='mean'"):
        objective = backends.make_objective(model, X, y, chunk_size=8)
    x0 = objective.flat.read()
    assert objective.value(x0) == pytest.approx(_truth(model, X, y)(x0), rel=_tolerances(objective)[0])


@pytest.mark.parametrize("kind, declared, anchor", [("mean", "sum", 0.7), ("sum", "mean", 0.0), ("mean", "sum", 0.0)])
def test_a_declaration_that_does_not_add_up_is_refused_with_the_numbers(keras, kind, declared, anchor):
    X, y = _data()
    model = _custom(keras, kind, anchor=anchor)
    with pytest.raises(ValueError, match=rf"loss_over_rows='{declared}' does not add up .* first 16 rows"):
        backends.make_objective(model, X, y, chunk_size=8, loss_over_rows=declared)


def test_a_declaration_is_measured_even_when_the_data_fits_one_chunk(keras):
    X, y = _data()
    model = _custom(keras, "sum")
    with pytest.raises(ValueError, match="does not add up .* first 37 rows .* chunks of 18 and 19 rows"):
        backends.make_objective(model, X, y, loss_over_rows="mean")


def test_a_declaration_against_the_compiled_reduction_is_refused(keras):
    X, y = _data()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    with pytest.raises(ValueError, match="contradicts the model's compiled loss.*a mean over rows"):
        backends.make_objective(model, X, y, chunk_size=8, loss_over_rows="sum")
    # Declaring what the reduction shows is accepted.
    objective = backends.make_objective(model, X, y, chunk_size=8, loss_over_rows="mean")
    assert np.isfinite(objective.value(objective.flat.read()))


def test_an_unknown_declaration_is_refused_before_any_work(keras):
    model = _custom(keras, "mean")
    with pytest.raises(ValueError, match="Unknown loss_over_rows 'avg'; choose 'mean'"):
        scipy_optimizer.make_train_function(model, method="L-BFGS-B", loss_over_rows="avg")


def test_fit_chunked_by_a_declaration_follows_the_one_piece_run(keras):
    X, y = _data()
    runs = {}
    for label, settings in (("chunked", {"chunk_size": 8, "loss_over_rows": "mean"}), ("one piece", {})):
        model = _custom(keras, "mean", anchor=0.7)
        truth = _truth(model, X, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=20,
                                                                       **settings)
        model.fit(X, y, batch_size=5, verbose=0)
        objective = model.train_function.objective
        runs[label] = (objective.flat.read(), truth(objective.flat.read()), model.train_function.result.nit)
    (x_chunked, f_chunked, nit), (x_whole, f_whole, _) = runs["chunked"], runs["one piece"]
    rel = 1e-6 if objective.computes_float64 else 1e-2
    assert nit == 20
    assert f_chunked == pytest.approx(f_whole, rel=rel)
    np.testing.assert_allclose(x_chunked, x_whole, rtol=rel, atol=rel * np.max(np.abs(x_whole)))
