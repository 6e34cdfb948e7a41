"""Least squares (lm, trf, dogbox) and Gauss-Newton curvature through the same interface."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    assert_left_at_a_finite_better_point,
    central_differences,
    full_batch_loss,
    regression,
    small_mlp,
)

from keras_opt_ref import scipy_optimizer
from keras_opt_ref.backends.tensorflow.least_squares import (
    JacobianTooLargeError,
    LeastSquaresObjective,
    NotSquaredErrorError,
)
from keras_opt_ref.bench import workloads


def _two_output_model(keras, l2=0.01):
    inp = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(l2))(inp)
    out_a = keras.layers.Dense(1, name="a")(hidden)
    out_b = keras.layers.Dense(2, name="b")(hidden)
    model = keras.Model(inp, [out_a, out_b])
    model.compile(loss=["mse", "mse"], loss_weights=[0.7, 2.0])
    return model


def _two_output_data(n=30):
    X, y = regression(n=n)
    rng = np.random.default_rng(3)
    return X, [y, rng.normal(size=(n, 2))], rng.uniform(0.5, 2.0, size=n)


def test_squared_residuals_are_keras_loss(keras, float64):
    model = _two_output_model(keras)
    X, ys, sw = _two_output_data()
    obj = LeastSquaresObjective(model, X, ys, sw)
    x0 = obj.flat.read()
    r = obj.residuals(x0)
    assert r.shape == (obj.num_residuals,) == (30 * 3 + 3 * 4,)  # 3 values per sample, 12 L2-regularized weights
    # evaluate reports through a float32 metric: agreement to float32 precision.
    assert r @ r == pytest.approx(full_batch_loss(model, X, ys, sw), rel=1e-6)
    assert r @ r == pytest.approx(obj.value(x0), rel=1e-12)


def test_jacobian_matches_finite_differences_and_half_the_gradient(keras, float64):
    model = _two_output_model(keras)
    X, ys, sw = _two_output_data()
    obj = LeastSquaresObjective(model, X, ys, sw)
    x = obj.flat.read() + 0.1
    J = obj.jacobian(x)
    # float64 model, h = 1e-6: truncation O(h^2) and rounding O(1e-16/h) are both < 1e-8.
    np.testing.assert_allclose(J, central_differences(obj.residuals, x), rtol=1e-6, atol=1e-8)
    _, g = obj.value_and_grad(x)
    # Agrees to ~2e-10 absolute, not to float64 rounding: Keras's own gradient of the L2 terms
    # differs at that level (cause not pinned down). A wrong scale or term is off by O(1).
    np.testing.assert_allclose(J.T @ obj.residuals(x), g / 2, rtol=1e-6, atol=1e-9)


def test_gauss_newton_product_and_operator_match_the_dense_jacobian(keras, float64):
    model = _two_output_model(keras)
    X, ys, sw = _two_output_data()
    obj = LeastSquaresObjective(model, X, ys, sw, chunk_size=7)  # several row blocks
    x = obj.flat.read() - 0.05
    rng = np.random.default_rng(0)
    p, u = rng.normal(size=obj.size), rng.normal(size=obj.num_residuals)
    J = obj.jacobian(x)
    np.testing.assert_allclose(obj.gauss_newton_hessp(x, p), 2 * J.T @ (J @ p), rtol=1e-9, atol=1e-12)
    G = obj.gauss_newton_hessian(x)
    np.testing.assert_allclose(G, 2 * J.T @ J, rtol=1e-9, atol=1e-12)
    assert np.linalg.eigvalsh(G).min() > -1e-10, "Gauss-Newton must be positive semi-definite"
    op = obj.jacobian_operator(x)
    np.testing.assert_allclose(op.matvec(p), J @ p, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(op.rmatvec(u), J.T @ u, rtol=1e-9, atol=1e-12)


def _curve_model(keras):
    class Decay(keras.layers.Layer):
        """y = a * exp(-b x) + c."""

        def build(self, input_shape):
            init = keras.initializers.Constant
            self.a = self.add_weight(shape=(), initializer=init(1.0), name="a")
            self.b = self.add_weight(shape=(), initializer=init(0.5), name="b")
            self.c = self.add_weight(shape=(), initializer=init(0.0), name="c")

        def call(self, x):
            return self.a * tf.exp(-self.b * x) + self.c

    model = keras.Sequential([keras.Input((1,)), Decay()])
    model.compile(loss="mse")
    return model


@pytest.mark.parametrize("method", scipy_optimizer.LEAST_SQUARES_METHODS)
def test_curve_fit_recovers_the_parameters(keras, method):
    x = np.linspace(0, 4, 30).reshape(-1, 1).astype("float32")
    y = 2.5 * np.exp(-1.3 * x) + 0.5
    model = _curve_model(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method=method, max_nfev=200, xtol=1e-12)
    history = model.fit(x, y, batch_size=7, verbose=0)  # uneven batches: the objective is still the whole set
    np.testing.assert_allclose([float(v.numpy()) for v in model.trainable_variables], [2.5, 1.3, 0.5], atol=1e-4)
    assert history.history["loss"][-1] == pytest.approx(full_batch_loss(model, x, y), rel=1e-6, abs=1e-12)
    result = model.train_function.result
    assert result.nfev > 0 and result.njev > 0 and result.success, result.message


@pytest.mark.parametrize("method", scipy_optimizer.LEAST_SQUARES_METHODS)
def test_readme_regression(keras, method):
    X, y = workloads.readme_regression()
    model = workloads.linear_model(keras, 4, use_bias=False)
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method=method)
    model.fit(X, y, verbose=0)
    np.testing.assert_allclose(model.get_weights()[0].ravel(), [1, 2, 3, 4], atol=1e-4)


@pytest.mark.slow  # about 13 s: the default run is at its 15-minute budget
def test_trf_bounds_and_matrix_free_jacobian(keras):
    data = workloads.factorization_data(*workloads.FACTORIZATION_SIZES["tiny"])
    model = workloads.factorization_model(keras, data.n_users, data.n_items)
    model.compile(loss="mse")
    start = full_batch_loss(model, data.x, data.ratings)
    train = scipy_optimizer.make_train_function(
        model, method="trf", jacobian="operator", max_nfev=30, bounds=(-0.5, 0.5)
    )
    model.train_function = train
    model.fit(data.x, data.ratings, batch_size=len(data.ratings), verbose=0)
    assert train.jacobian_mode == "operator"
    assert train.result.fun < 0.2 * start
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    assert weights.min() >= -0.5 and weights.max() <= 0.5


@pytest.mark.parametrize("method", ["trust-ncg", "trust-krylov", "trust-exact", "dogleg", "Newton-CG"])
def test_gauss_newton_curvature_for_minimize_methods(keras, method):
    X, y = regression(n=60)
    model = small_mlp(keras)
    model.compile(loss="mse")
    start = full_batch_loss(model, X, y)
    train = scipy_optimizer.make_train_function(model, method=method, maxiter=30, hessian="gauss-newton")
    model.train_function = train
    model.fit(X, y, batch_size=60, verbose=0)
    assert isinstance(train.objective, LeastSquaresObjective)
    assert train.result.nhev > 0, "the Gauss-Newton curvature must be handed to scipy"
    assert train.result.fun < 0.5 * start


# ------------------------------------------------------------------ bad input
def _compiled(keras, loss="mse", **kwargs):
    model = small_mlp(keras, **kwargs)
    model.compile(loss=loss)
    return model


def test_non_squared_error_loss_refused(keras):
    X, y = regression()
    model = _compiled(keras, loss="mae")
    model.train_function = scipy_optimizer.make_train_function(model, method="trf")
    with pytest.raises(NotSquaredErrorError, match="mean squared error"):
        model.fit(X, y, verbose=0)


def test_l1_regularizer_refused(keras):
    X, y = regression()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L1(0.1))])
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="lm")
    with pytest.raises(NotSquaredErrorError, match="only L2"):
        model.fit(X, y, verbose=0)


def test_lm_with_fewer_residuals_than_weights_refused(keras):
    X, y = regression(n=10)  # 10 residuals, 26 weights
    model = _compiled(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="lm")
    with pytest.raises(ValueError, match="10 residuals < 26 weights.*'trf'"):
        model.fit(X, y, verbose=0)


def test_bounds_with_lm_refused(keras):
    with pytest.raises(ValueError, match="ignores bounds.*trf"):
        scipy_optimizer.make_train_function(_compiled(keras), method="lm", bounds=(0, 1))


def test_finite_difference_options_refused(keras):
    with pytest.raises(ValueError, match="exact"):
        scipy_optimizer.make_train_function(_compiled(keras), method="trf", diff_step=1e-3)


def test_jacobian_too_large_refused(keras):
    X, y = regression()
    model = _compiled(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="lm", max_jacobian_bytes=1000)
    with pytest.raises(JacobianTooLargeError, match="GiB.*'trf'"):
        model.fit(X, y, verbose=0)


def test_gauss_newton_needs_a_hessian_method(keras):
    with pytest.raises(ValueError, match="takes none"):
        scipy_optimizer.make_train_function(_compiled(keras), method="CG", hessian="gauss-newton")


@pytest.mark.parametrize("failure", ["nan", KeyboardInterrupt()], ids=["nan", "interrupt"])
def test_least_squares_failure_leaves_best_point(keras, monkeypatch, failure):
    X, y = regression(n=60)
    model = _compiled(keras)
    start = full_batch_loss(model, X, y)
    real = LeastSquaresObjective.residuals
    calls = {"n": 0}

    def sabotaged(obj, x):
        calls["n"] += 1
        if calls["n"] > 5:  # 1 for the consistency check, then 4 of scipy's
            if failure == "nan":
                return np.full(obj.num_residuals, np.nan)
            raise failure
        return real(obj, x)

    monkeypatch.setattr(LeastSquaresObjective, "residuals", sabotaged)
    train = scipy_optimizer.make_train_function(model, method="trf", max_nfev=50)
    model.train_function = train
    if failure == "nan":
        try:
            model.fit(X, y, verbose=0)
        except ValueError:  # scipy may refuse non-finite residuals outright
            pass
    else:
        with pytest.raises(KeyboardInterrupt):
            model.fit(X, y, verbose=0)
    assert_left_at_a_finite_better_point(train, model, X, y, start)
