"""Shared fixtures. The Keras flavour comes from TF_USE_LEGACY_KERAS, as in TensorFlow."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_opt_ref.base import keras_compat as _keras  # noqa: E402
from keras_opt_ref.base import nest  # noqa: E402

KERAS = _keras.default_keras()

# TensorFlow only where it is installed: the JAX and torch tests run without it (pip install ".[jax,test]").
tf = None
if importlib.util.find_spec("tensorflow") is not None and KERAS.backend.backend() == "tensorflow":
    import tensorflow as tf

    # tests/test_distributed.py runs tf.distribute strategies on two logical CPU devices, which must be
    # configured before TensorFlow initializes its devices; one device stays the default placement.
    try:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:  # devices already initialized (e.g. by a plugin): the distributed tests skip
        pass


def pytest_report_header(config):
    return f"keras flavour: {KERAS.__name__} {KERAS.__version__}; tensorflow {tf.__version__ if tf else 'not used'}"


def pytest_terminal_summary(terminalreporter):
    """The bad-input table's counts per class (refused / handled / recovered) and outcome."""
    import collections

    counts = collections.Counter()
    for outcome in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            kind = dict(getattr(report, "user_properties", ())).get("kind")
            if kind:
                counts[kind, outcome] += 1
    if counts:
        row = ", ".join(
            f"{kind}: " + " ".join(f"{counts[kind, o]} {o}" for o in ("passed", "failed", "skipped") if counts[kind, o])
            for kind in ("refused", "handled", "recovered")
            if any(counts[kind, o] for o in ("passed", "failed", "skipped"))
        )
        terminalreporter.write_line(f"bad-input table on {KERAS.__name__} {KERAS.__version__}: {row}")


@pytest.fixture
def keras():
    return KERAS


@pytest.fixture(autouse=True)
def _seeded():
    KERAS.utils.set_random_seed(1234)
    yield
    KERAS.backend.clear_session()
    if KERAS.__name__ == "tf_keras":
        # Keras 3's clear_session collects garbage; tf-keras's does not. Without it, the tests' cyclic
        # garbage (models, graphs, tf.data iterators) piles up until one later collection frees it all,
        # inside whichever test it lands in: measured 7.6 s in one.
        gc.collect()


@pytest.fixture
def float64():
    """Build models in float64 so finite differences can be compared at ~1e-7."""
    old = KERAS.backend.floatx()
    KERAS.backend.set_floatx("float64")
    yield
    KERAS.backend.set_floatx(old)


def full_batch_loss(model, x, y=None, sample_weight=None) -> float:
    """Keras's own loss over the whole data set in one batch: the ground truth."""
    n = len(nest.leaves(x)[0])
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


class ScipySpy:
    """Wraps scipy.optimize.minimize and least_squares: counts every call scipy makes to the
    callables it is handed and records each evaluated point with its loss (r . r for residuals).
    The independent truth for ``result.nfev/njev/nhev/nit`` and for "the best point evaluated"."""

    def __init__(self, monkeypatch, forbid: bool = False):
        import collections

        import scipy.optimize

        self.calls = collections.Counter()
        self.evaluations: list[tuple[np.ndarray, float]] = []
        self.runs = 0
        real_minimize, real_least_squares = scipy.optimize.minimize, scipy.optimize.least_squares

        def counted(name, fn, loss=None):
            def wrapped(x, *args):
                self.calls[name] += 1
                out = fn(x, *args)
                if loss is not None:
                    self.evaluations.append((np.array(x, dtype=np.float64), loss(out)))
                return out

            return wrapped

        def callback(fn):
            def wrapped(intermediate_result):
                self.calls["callback"] += 1
                return fn(intermediate_result)

            return wrapped

        def first(out):
            return float(out[0] if isinstance(out, tuple) else out)

        def minimize(fun, x0, **kwargs):
            if forbid:
                raise AssertionError("scipy.optimize.minimize was called: the bad input was not refused before work")
            self.runs += 1
            fun = counted("fun", fun, first)
            for key in ("hess", "hessp"):
                if callable(kwargs.get(key)):
                    kwargs[key] = counted(key, kwargs[key])
            if kwargs.get("callback") is not None:
                kwargs["callback"] = callback(kwargs["callback"])
            return real_minimize(fun, x0, **kwargs)

        def least_squares(fun, x0, **kwargs):
            if forbid:
                raise AssertionError("scipy.optimize.least_squares was called: the bad input was not refused")
            self.runs += 1
            fun = counted("fun", fun, lambda r: float(np.dot(r, r)))
            kwargs["jac"] = counted("jac", kwargs["jac"])
            if kwargs.get("callback") is not None:
                kwargs["callback"] = callback(kwargs["callback"])
            return real_least_squares(fun, x0=x0, **kwargs)

        monkeypatch.setattr(scipy.optimize, "minimize", minimize)
        monkeypatch.setattr(scipy.optimize, "least_squares", least_squares)

    def best(self) -> tuple[np.ndarray, float]:
        """The evaluated point with the lowest finite loss, and that loss."""
        finite = [(f, i) for i, (_, f) in enumerate(self.evaluations) if np.isfinite(f)]
        f, i = min(finite)
        return self.evaluations[i][0], f


@pytest.fixture
def scipy_spy(monkeypatch):
    return ScipySpy(monkeypatch)


def assert_recovered(train, model, x, y, spy: ScipySpy, sample_weight=None) -> None:
    """After a run that failed or was interrupted: scipy was never handed a NaN/Inf, the model holds
    the best point scipy evaluated (as the variables' dtype holds it), result.x is that point and
    result.fun Keras's loss there; the counts are the calls scipy made."""
    result = train.result
    assert not result.success, result.message
    received = [f for _, f in spy.evaluations]
    assert np.all(np.isfinite(received)), f"scipy was handed a non-finite loss: {received}"
    weights = train.objective.flat.read()
    np.testing.assert_array_equal(weights, result.x)
    best_x, best_f = spy.best()
    dtype = train.objective.flat.common_dtype
    np.testing.assert_array_equal(result.x, best_x.astype(dtype).astype(np.float64), err_msg="not the best point")
    np.testing.assert_allclose(full_batch_loss(model, x, y, sample_weight), result.fun, rtol=1e-5)
    np.testing.assert_allclose(result.fun, best_f, rtol=1e-5)
    assert result.nfev == spy.calls["fun"], (result.nfev, spy.calls)
    assert result.nhev == spy.calls["hess"] + spy.calls["hessp"], (result.nhev, spy.calls)
    if train.method.least_squares:
        assert result.njev == spy.calls["jac"], (result.njev, spy.calls)
    elif train.method.jac:
        assert result.njev == spy.calls["fun"], (result.njev, spy.calls)
    if train.method.name != "lm":
        assert result.nit == spy.calls["callback"], (result.nit, spy.calls)


def faulty_model(keras, after: int, fault: str):
    """tanh MLP with a layer that counts its calls in a variable: past ``after`` calls its output
    turns NaN (``fault="nan"``) or an assertion inside the compiled graph fails (``"error"``).
    Returns the compiled model and the fault layer."""

    class Fault(keras.layers.Layer):
        def build(self, shape):
            self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")

        def call(self, x):
            self.calls.assign_add(1.0)
            if fault == "nan":
                return x + tf.where(self.calls > after, tf.constant(np.nan, x.dtype), tf.zeros((), x.dtype))
            check = tf.debugging.assert_less_equal(self.calls, float(after), message="injected failure")
            with tf.control_dependencies([check]):
                return tf.identity(x)

    fault_layer = Fault()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), fault_layer,
                              keras.layers.Dense(1)])
    model.compile(loss="mse")
    return model, fault_layer
