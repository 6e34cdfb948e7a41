"""The same contract on whichever Keras backend runs the tests (KERAS_BACKEND: tensorflow, jax, torch).

Ground truth is backend-independent: ``model.evaluate`` over all samples in one batch, NumPy least
squares for the linear optimum, and central differences whose steps follow the precision the
backend really computes a float64 model in (``keras_opt_ref_conformance.truth.Steps``: Keras 3 on
JAX and torch demotes float64 to float32 in tanh and means). tox runs this file on each backend
(envs keras3, keras3-jax, keras3-torch); on tf-keras it is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes"):
    pytest.skip("the backend contract is a Keras 3 matter (tf-keras runs on TensorFlow only)", allow_module_level=True)

import keras  # noqa: E402
from keras_opt_ref_conformance.truth import Steps, central_gradient, working_precision  # noqa: E402

from keras_opt_ref import backends, scipy_optimizer  # noqa: E402
from keras_opt_ref.bench.workloads import make_workload  # noqa: E402

BACKEND = keras.backend.backend()
MINIMIZE = [m for m in scipy_optimizer.METHODS if m not in ("COBYLA", "COBYQA", "Nelder-Mead", "Powell")]
RNG = np.random.default_rng(3)
X = RNG.normal(size=(53, 4)).astype("float32")
W_TRUE = np.array([1.0, 2.0, 3.0, 4.0])
Y = (X @ W_TRUE + 0.5 + 0.01 * RNG.normal(size=53)).astype("float32")[:, None]
SW = RNG.uniform(0.5, 2.0, size=53).astype("float32")


@pytest.fixture(autouse=True)
def _fresh():
    keras.utils.set_random_seed(1)
    yield
    keras.backend.clear_session()


def mlp(l2=0.01, loss="mse", dtype=None):
    layers = keras.layers
    reg = keras.regularizers.L2(l2) if l2 else None
    hidden = layers.Dense(6, activation="tanh", kernel_regularizer=reg, dtype=dtype)
    model = keras.Sequential([keras.Input((4,), dtype=dtype), hidden, layers.Dense(1, dtype=dtype)])
    model.compile(loss=loss)
    return model


def _modules_loaded_by(code: str) -> list[str]:
    """The frameworks a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys; print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))"
    return eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def test_importing_the_package_loads_no_framework():
    assert _modules_loaded_by("import keras_opt_ref") == []


@pytest.mark.skipif(BACKEND == "tensorflow", reason="on TensorFlow, TensorFlow is the framework in use")
def test_fitting_on_this_backend_loads_no_tensorflow():
    code = (
        "import numpy as np, keras\n"
        "from keras_opt_ref import scipy_optimizer\n"
        "model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
        "model.compile(loss='mse')\n"
        "model.train_function = scipy_optimizer.make_train_function(model, method='L-BFGS-B', maxiter=5)\n"
        "model.fit(np.ones((8, 2)), np.ones((8, 1)), verbose=0)"
    )
    assert "tensorflow" not in _modules_loaded_by(code)
    assert BACKEND in _modules_loaded_by(code)


def test_the_backend_objective_is_chosen():
    assert backends.objective_class(mlp()).backend == BACKEND


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
@pytest.mark.parametrize("chunk_size", [10, 1000])
def test_value_equals_evaluate(reduction, chunk_size):
    model = mlp(loss=keras.losses.MeanSquaredError(reduction=reduction))
    objective = backends.make_objective(model, X, Y, SW, chunk_size=chunk_size)
    x0 = objective.flat.read()
    expected = model.evaluate(X, Y, sample_weight=SW, batch_size=len(X), verbose=0)
    assert objective.value(x0) == pytest.approx(expected, rel=2e-6)
    f, g = objective.value_and_grad(x0 * 1.1)
    objective.set_weights(x0 * 1.1)
    assert f == pytest.approx(model.evaluate(X, Y, sample_weight=SW, batch_size=len(X), verbose=0), rel=2e-6)
    assert g.dtype == np.float64 and g.shape == (objective.size,)


@pytest.fixture
def float64():
    old = keras.backend.floatx()
    keras.backend.set_floatx("float64")
    if BACKEND == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("float64 on JAX needs JAX_ENABLE_X64=1 (tox's keras3-jax env sets it)")
    yield Steps(working_precision(keras))
    keras.backend.set_floatx(old)


@pytest.mark.parametrize("chunk_size", [16, 1000])
def test_derivatives_against_finite_differences(float64, chunk_size):
    steps = float64
    model = mlp(l2=0.02)
    objective = backends.make_objective(model, X.astype("float64"), Y.astype("float64"), chunk_size=chunk_size)
    x = objective.flat.read() + 0.1 * np.random.default_rng(0).normal(size=objective.size)
    g = objective.gradient(x)
    np.testing.assert_allclose(g, central_gradient(objective.value, x, steps.h), rtol=steps.rtol, atol=steps.atol)
    p = np.random.default_rng(1).normal(size=objective.size)
    hp = objective.hessp(x, p)
    fd = (objective.gradient(x + steps.h_hvp * p) - objective.gradient(x - steps.h_hvp * p)) / (2 * steps.h_hvp)
    np.testing.assert_allclose(hp, fd, rtol=10 * steps.rtol, atol=10 * steps.atol)
    H = objective.hessian(x)
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    np.testing.assert_allclose(H @ p, hp, rtol=steps.exact * 10, atol=steps.exact)


def test_embedding_gradient_and_hvp(float64):
    steps = float64
    workload = make_workload("factorization", "small", keras=keras)
    x_in = [np.asarray(t)[:200] for t in workload.x]
    y = np.asarray(workload.y)[:200]
    objective = backends.make_objective(workload.model, x_in, y, chunk_size=64)
    x = objective.flat.read()
    hits = np.flatnonzero(objective.gradient(x))  # only rows the 200 ratings touch move the loss
    assert 0 < hits.size < objective.size
    sample = hits[:: max(1, hits.size // 40)]
    g = objective.gradient(x)[sample]
    restricted = lambda v: objective.value(_with(x, sample, v))  # noqa: E731
    np.testing.assert_allclose(g, central_gradient(restricted, x[sample], steps.h), rtol=steps.rtol, atol=steps.atol)
    assert objective.value(x) == pytest.approx(
        workload.model.evaluate(x_in, y, batch_size=200, verbose=0), rel=1e-5)


def _with(x, where, values):
    out = x.copy()
    out[where] = values
    return out


@pytest.mark.parametrize("method", MINIMIZE)
def test_every_method_reaches_the_least_squares_optimum(method):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=500)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)  # uneven batches: 16+16+16+5
    A = np.hstack([X, np.ones((len(X), 1))]).astype(np.float64)
    best = np.linalg.lstsq(A, Y[:, 0].astype(np.float64), rcond=None)[0]
    kernel, bias = model.get_weights()
    np.testing.assert_allclose(np.r_[kernel.ravel(), bias], best, atol=2e-3, err_msg=method)
    result = model.train_function.result
    assert result.fun == pytest.approx(model.evaluate(X, Y, batch_size=len(X), verbose=0), rel=1e-5)


def test_readme_regression_and_epochs():
    x = np.random.default_rng(42).uniform(size=(10, 4))
    y = x @ W_TRUE
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=20)
    history = model.fit(x, y, batch_size=3, epochs=2, verbose=0)
    np.testing.assert_allclose(model.get_weights()[0].ravel(), W_TRUE, atol=1e-4)
    assert set(history.history) >= {"loss", "nit", "nfev", "njev", "nhev"} and len(history.history["loss"]) == 2
    assert len(model.train_function.results) == 2


def test_factorization_fit_reaches_a_small_loss():
    workload = make_workload("factorization", "small", keras=keras)
    start = workload.model.evaluate(workload.x, workload.y, batch_size=len(workload.y), verbose=0)
    workload.model.train_function = scipy_optimizer.make_train_function(workload.model, method="L-BFGS-B", maxiter=300)
    workload.model.fit(workload.x, workload.y, batch_size=1024, verbose=0)
    end = workload.model.evaluate(workload.x, workload.y, batch_size=len(workload.y), verbose=0)
    assert end < 0.05 * start
    assert model_holds(workload.model, workload.model.train_function.result.x)


def test_one_evaluation_taken_apart_on_this_backend():
    """bench.boundary on this backend: the objective's three steps are timed, and the same math hand-written on
    this backend, in Keras's form and the elementwise one, agrees with the reference (measure refuses to time
    functions that disagree)."""
    from keras_opt_ref.bench import boundary

    row = boundary.measure("factorization", "tiny", rounds=1, repeat=1)
    assert row["backend"] == BACKEND and row["weights"] > 0
    for step in ("in", "call", "out", "evaluation", "same-math keras evaluation", "same-math elementwise call"):
        assert row[f"{step} ms"][0] > 0, step
    assert ("empty call ms" in row) == (BACKEND != "torch")


def model_holds(model, x):
    return np.allclose(np.concatenate([np.ravel(w) for w in model.get_weights()]), x)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="refusals of what only the TensorFlow objective computes")
@pytest.mark.parametrize("options", [dict(method="lm"), dict(method="trust-ncg", hessian="gauss-newton"),
                                     dict(method="trust-ncg", subproblem="in-graph")])
def test_tensorflow_only_features_are_refused_before_work(options):
    with pytest.raises(ValueError, match=f"TensorFlow objective only.*'{BACKEND}' backend"):
        scipy_optimizer.make_train_function(mlp(), **options)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's 64-bit switch")
def test_jax_float64_without_x64_is_refused():
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(TypeError, match="jax_enable_x64"):
            backends.make_objective(mlp(dtype="float64"), X, Y)
    finally:
        jax.config.update("jax_enable_x64", before)
