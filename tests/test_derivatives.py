"""Exact derivatives against independent truth: float64 finite differences.

Tolerances: central differences with step h on a float64 model have truncation error
O(h^2 |f'''|) and rounding error O(eps |f| / h); with h = 1e-6 (gradient) or 1e-5 (HVP,
differencing the gradient) both are below ~1e-8 relative for these smooth, O(1) losses,
so rtol 1e-6 leaves two orders of margin while still catching any real error (a dropped
term, a sign, a factor, float32 rounding at ~1e-7 relative shows as > 1e-6 in sums).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import central_differences, directional_difference, regression, small_mlp

from keras_opt_ref import FlatVariables, HessianTooLargeError, TensorFlowObjective


def _mlp_objective(keras, **kwargs):
    X, y = regression(n=30)
    sw = np.random.default_rng(1).uniform(0.5, 1.5, size=30)
    model = small_mlp(keras, l2=0.02)
    model.compile(loss="mse")
    return TensorFlowObjective(model, X, y, sw, **kwargs)


def _embedding_objective(keras, with_dense: bool):
    """Repeated indices on purpose: every row id appears several times in a 40-sample batch."""
    rng = np.random.default_rng(4)
    ids = keras.Input((2,), dtype="int32")
    emb = keras.layers.Flatten()(keras.layers.Embedding(6, 3)(ids))
    # Without a trainable dense layer, a frozen one sums tanh of the looked-up rows.
    head = keras.layers.Dense(1, trainable=with_dense, kernel_initializer="ones")
    out = head(keras.layers.Activation("tanh")(emb))
    model = keras.Model(ids, out)
    model.compile(loss="mse")
    X = rng.integers(0, 6, size=(40, 2)).astype("int32")
    assert len(np.unique(X)) < X.size  # duplicates present
    y = rng.normal(size=(40, 1))
    return TensorFlowObjective(model, X, y)


def _check_gradient(obj, x):
    f, g = obj.value_and_grad(x)
    fd = central_differences(obj.value, x, h=1e-6)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8 * max(1.0, abs(f)), err_msg="gradient != central FD")
    assert g.dtype == np.float64


def test_gradient_matches_finite_differences(keras, float64):
    obj = _mlp_objective(keras)
    _check_gradient(obj, obj.flat.read())


@pytest.mark.parametrize("with_dense", [False, True], ids=["embedding", "embedding+dense"])
def test_embedding_gradient_sums_duplicates(keras, float64, with_dense):
    obj = _embedding_objective(keras, with_dense)
    _check_gradient(obj, obj.flat.read() + 0.3)


def test_hvp_matches_finite_differences_and_dense_hessian(keras, float64):
    obj = _mlp_objective(keras)
    x = obj.flat.read()
    rng = np.random.default_rng(0)
    p = rng.normal(size=x.size)
    hp = obj.hessp(x, p)
    fd = directional_difference(obj.gradient, x, p, h=1e-5)
    np.testing.assert_allclose(hp, fd, rtol=1e-6, atol=1e-8, err_msg="hessp != FD of gradient")
    H = obj.hessian(x)
    assert H.shape == (x.size, x.size)
    np.testing.assert_allclose(H, H.T, atol=1e-12, err_msg="Hessian not symmetric")
    np.testing.assert_allclose(H @ p, hp, rtol=1e-9, atol=1e-10, err_msg="hessian @ p != hessp")
    # Dense Hessian against finite differences of the gradient, column by column.
    H_fd = central_differences(obj.gradient, x, h=1e-5)
    np.testing.assert_allclose(H, H_fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_hvp_modes_agree_and_are_linear(keras, float64, mode):
    if mode == "forward-over-reverse" and keras.__name__ == "tf_keras":
        pytest.skip("tf-keras layers under TensorFlow forward mode: reverse-over-reverse is used")
    obj = _mlp_objective(keras, hvp_mode=mode)
    x = obj.flat.read()
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=x.size), rng.normal(size=x.size)
    hp, hq = obj.hessp(x, p), obj.hessp(x, q)
    np.testing.assert_allclose(obj.hessp(x, 2.0 * p - 3.0 * q), 2.0 * hp - 3.0 * hq, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(hp, directional_difference(obj.gradient, x, p), rtol=1e-6, atol=1e-8)


def test_embedding_hvp(keras, float64):
    obj = _embedding_objective(keras, with_dense=True)
    x = obj.flat.read() + 0.2
    p = np.random.default_rng(2).normal(size=x.size)
    np.testing.assert_allclose(
        obj.hessp(x, p), directional_difference(obj.gradient, x, p), rtol=1e-6, atol=1e-8
    )


def test_callables_honour_x_in_any_order(keras, float64):
    """f at x1, then hessp at x0, must equal hessp at x0 computed fresh (the fork's bug)."""
    obj = _mlp_objective(keras)
    x0 = obj.flat.read()
    rng = np.random.default_rng(3)
    x1 = x0 + rng.normal(size=x0.size)
    p = rng.normal(size=x0.size)
    fresh = _mlp_objective(keras)
    want_hp, want_f, want_g = fresh.hessp(x0, p), fresh.value(x0), fresh.gradient(x0)
    want_H = fresh.hessian(x0)
    obj.value_and_grad(x1)
    np.testing.assert_allclose(obj.hessp(x0, p), want_hp, rtol=1e-12)
    obj.hessp(x1, p)
    np.testing.assert_allclose(obj.value(x0), want_f, rtol=1e-12)
    obj.hessian(x1)
    np.testing.assert_allclose(obj.gradient(x0), want_g, rtol=1e-12)
    obj.value(x1)
    np.testing.assert_allclose(obj.hessian(x0), want_H, rtol=1e-10, atol=1e-13)


def test_float32_model_gradients_are_float64_at_the_boundary(keras):
    X, y = regression(n=30)
    model = small_mlp(keras)
    model.compile(loss="mse")
    obj = TensorFlowObjective(model, X, y)
    f, g = obj.value_and_grad(obj.flat.read())
    assert isinstance(f, float) and g.dtype == np.float64 and g.shape == (obj.size,)


def test_dense_hessian_refused_above_limit(keras):
    X, y = regression(n=30)
    model = small_mlp(keras, hidden=20)
    model.compile(loss="mse")
    obj = TensorFlowObjective(model, X, y, max_hessian_params=50)
    with pytest.raises(HessianTooLargeError) as err:
        obj.hessian(obj.flat.read())
    message = str(err.value)
    assert f"{obj.size} weights" in message and "GiB" in message and "trust-ncg" in message


def test_flat_layout_roundtrip(keras):
    model = small_mlp(keras, n_features=3, hidden=4)
    flat = FlatVariables.from_variables(model.trainable_variables)
    assert flat.shapes == ((3, 4), (4,), (4, 1), (1,))
    assert flat.offsets == (0, 12, 16, 20, 21) and flat.size == 21
    x = np.arange(21, dtype=np.float64)
    flat.write(x)
    np.testing.assert_array_equal(flat.read(), x)
    kernel = model.layers[0].get_weights()[0]
    np.testing.assert_array_equal(kernel, np.arange(12).reshape(3, 4))  # C order, variable order
    parts = flat.unpack(x)
    np.testing.assert_array_equal(flat.pack(parts), x)
    with pytest.raises(ValueError, match="shape"):
        flat.write(np.zeros(20))
