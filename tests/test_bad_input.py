"""Bad input and faults, as a table: each case, its class and the key words of its message.

- ``refused``: an exception of the expected type, raised on purpose by keras_opt_ref (the innermost
  frame is ours) before any optimization (scipy is never called) and with every model untouched.
- ``handled``: the run goes through and is right (each case asserts against ``model.evaluate`` or
  the reference it names); the expected warning, if any, is given.
- ``recovered``: a failure during the run; the model holds the best finite point scipy evaluated,
  ``result.message`` gives the reason, the counts are the calls scipy made (``assert_recovered``).

``python -m pytest tests/test_bad_input.py -q`` prints the counts per class at the end (see
``pytest_terminal_summary`` in conftest.py); ``TF_USE_LEGACY_KERAS=1`` runs it on tf-keras.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import tensorflow as tf
from conftest import KERAS, ScipySpy, assert_recovered, faulty_model, full_batch_loss, regression, small_mlp

import keras_opt_ref
from keras_opt_ref import FlatVariables, HessianTooLargeError, TensorFlowObjective, scipy_optimizer
from keras_opt_ref.backends.tensorflow.least_squares import (
    JacobianTooLargeError,
    LeastSquaresObjective,
    NotSquaredErrorError,
)

PACKAGE = Path(keras_opt_ref.__file__).parent
LEGACY = KERAS.__name__ == "tf_keras"


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "refused" | "handled" | "recovered"
    run: Callable[[Ctx], object]
    expect: str  # regex: the exception's message, the warning's, or result.message
    error: type[BaseException] | None = None  # refused: the type raised; recovered: the one re-raised, if any
    by_keras: bool = False  # refused by Keras itself, before keras_opt_ref sees the data
    keras3_only: bool = False


class Ctx:
    """What a case gets: the Keras module, and a record of the models it makes (checked untouched
    when the case is refused)."""

    def __init__(self, keras):
        self.keras = keras
        self.models: list = []

    def track(self, model):
        self.models.append((model, [w.copy() for w in model.get_weights()] if model.built else None))
        return model

    def mlp(self, loss="mse", **kwargs):
        model = small_mlp(self.keras, **kwargs)
        model.compile(loss=loss)
        return self.track(model)


def _fit(ctx, model, x, y=None, *, fit_kwargs=None, **train_kwargs):
    train = scipy_optimizer.make_train_function(model, **train_kwargs)
    model.train_function = train
    model.fit(x, y, verbose=0, **(fit_kwargs or {}))
    return train


X, Y = regression(n=30)
SW = np.random.default_rng(4).uniform(0.5, 2.0, size=30)


# ------------------------------------------------------------------------------ refused
def _with_nan(where):
    def run(ctx):
        data = {"inputs": X.copy(), "targets": Y.copy(), "sample weights": SW.copy()}
        data[where].flat[3] = np.inf if where == "sample weights" else np.nan
        _fit(ctx, ctx.mlp(), data["inputs"], data["targets"], fit_kwargs=dict(sample_weight=data["sample weights"]),
             method="L-BFGS-B")

    return run


def _option(**train_kwargs):
    def run(ctx):
        _fit(ctx, ctx.mlp(), X, Y, **{"method": "L-BFGS-B", **train_kwargs})

    return run


def _no_trainable(ctx):
    model = ctx.mlp()
    model.trainable = False
    model.compile(loss="mse")
    scipy_optimizer.make_train_function(model)


def _stochastic(ctx):
    k = ctx.keras
    model = k.Sequential([k.Input((3,)), k.layers.Dense(4), k.layers.Dropout(0.3), k.layers.Dense(1)])
    model.compile(loss="mse")
    scipy_optimizer.make_train_function(ctx.track(model))


def _float16(ctx):
    k = ctx.keras
    model = k.Sequential([k.Input((3,)), k.layers.Dense(1, dtype="mixed_float16")])
    model.compile(loss="mse")
    scipy_optimizer.make_train_function(ctx.track(model))


def _embedding_model(ctx, input_dim=5):
    k = ctx.keras
    model = k.Sequential([k.Input((1,), dtype="int32"), k.layers.Embedding(input_dim, 2), k.layers.Flatten(),
                          k.layers.Dense(1)])
    model.compile(loss="mse")
    return ctx.track(model)


def _embedding_out_of_range(ctx):
    _fit(ctx, _embedding_model(ctx), np.array([[0], [4], [7]], "int32"), np.ones((3, 1)), method="L-BFGS-B")


def _reduction_none(ctx):
    model = small_mlp(ctx.keras)
    model.compile(loss=ctx.keras.losses.MeanSquaredError(reduction="none"))
    _fit(ctx, ctx.track(model), X, Y, method="L-BFGS-B")


def _endless_repeat(ctx):
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8).repeat()
    _fit(ctx, ctx.mlp(), dataset, method="L-BFGS-B")


def _endless_generator(ctx):
    def batches():
        while True:
            yield X[:8], Y[:8]

    _fit(ctx, ctx.mlp(), batches(), method="L-BFGS-B", max_data_bytes=64 * 2**10)


def _another_model(ctx):
    first, second = ctx.mlp(), ctx.mlp()
    second.train_function = scipy_optimizer.make_train_function(first, method="L-BFGS-B")
    second.fit(X, Y, verbose=0)


def _lsq_add_loss(ctx):
    """The add_loss term is zero at the start: a start-point check alone would pass it."""
    k = ctx.keras

    class Pull(k.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 1), initializer="ones", name="w")

        def call(self, x):
            self.add_loss(10.0 * tf.reduce_sum(tf.square(self.w - 1.0)))
            return tf.matmul(x, self.w)

    model = k.Sequential([k.Input((3,)), Pull()])
    model.compile(loss="mse")
    _fit(ctx, ctx.track(model), X, Y, method="trf")


def _lsq_masked(ctx):
    k = ctx.keras
    model = k.Sequential([k.Input((4, 2)), k.layers.Masking(0.0), k.layers.SimpleRNN(2, return_sequences=True),
                          k.layers.Dense(1)])
    model.compile(loss="mse")
    _fit(ctx, ctx.track(model), np.ones((6, 4, 2)), np.ones((6, 4, 1)), method="trf")


def _l1_model(ctx):
    k = ctx.keras
    model = k.Sequential([k.Input((3,)), k.layers.Dense(1, kernel_regularizer=k.regularizers.L1(0.1))])
    model.compile(loss="mse")
    return ctx.track(model)


REFUSED = [
    Case("not compiled", "refused", lambda ctx: scipy_optimizer.make_train_function(ctx.track(small_mlp(ctx.keras))),
         r"not compiled.*model\.compile", RuntimeError),
    Case("no trainable weights", "refused", _no_trainable, r"no trainable weights.*trainable", ValueError),
    Case("unknown method", "refused", _option(method="lbfgs"), r"Unknown method 'lbfgs'.*L-BFGS-B", ValueError),
    Case("NaN in the inputs", "refused", _with_nan("inputs"), r"The inputs.*1 NaN/Inf.*Clean", ValueError),
    Case("NaN in the targets", "refused", _with_nan("targets"), r"The targets.*NaN/Inf", ValueError),
    Case("Inf in the sample weights", "refused", _with_nan("sample weights"), r"The sample weights.*NaN/Inf",
         ValueError),
    Case("empty data", "refused", lambda ctx: TensorFlowObjective(ctx.mlp(), np.zeros((0, 3)), np.zeros((0, 1))),
         r"empty \(0 samples\)", ValueError),
    Case("sample counts disagree", "refused",
         lambda ctx: TensorFlowObjective(ctx.mlp(), np.zeros((5, 3)), np.zeros((4, 1))),
         r"disagree on the number of samples.*5.*4", ValueError),
    Case("stochastic layer", "refused", _stochastic, r"stochastic layers.*deterministic=True", ValueError),
    Case("float16 policy", "refused", _float16, r"float16.*float32", TypeError),
    Case("bounds with an unbounded method", "refused", _option(method="CG", bounds=(0, 1)),
         r"ignores bounds.*L-BFGS-B", ValueError),
    Case("dense Hessian too large", "refused",
         lambda ctx: scipy_optimizer.make_train_function(ctx.mlp(hidden=30), method="trust-exact",
                                                         max_hessian_params=100),
         r"151 weights.*GiB.*trust-ncg", HessianTooLargeError),
    Case("Embedding id out of range", "refused", _embedding_out_of_range, r"cannot evaluate.*7 is not in \[0, 5\)",
         ValueError),
    Case("wrong input shape", "refused", lambda ctx: _fit(ctx, ctx.mlp(), X[:, :2], Y, method="L-BFGS-B"),
         r"cannot evaluate its training data.*\(30, 2\)", ValueError),
    Case("maxiter=-1", "refused", _option(maxiter=-1), r"maxiter must be a positive integer, got -1", ValueError),
    Case("maxiter=2.7", "refused", _option(maxiter=2.7), r"maxiter .*2\.7 \(not a whole number\)", ValueError),
    Case("maxiter='abc'", "refused", _option(maxiter="abc"), r"maxiter must be a positive integer.*'abc'", TypeError),
    Case("maxcor=-3", "refused", _option(maxcor=-3), r"maxcor must be a positive integer, got -3", ValueError),
    Case("tol=-1", "refused", _option(tol=-1), r"tol must be a number >= 0, got -1", ValueError),
    Case("gtol='x'", "refused", _option(gtol="x"), r"gtol must be a number >= 0.*'x'", TypeError),
    Case("gtol=NaN", "refused", _option(gtol=math.nan), r"gtol must be a number >= 0.*nan", ValueError),
    Case("chunk_size=0", "refused", _option(chunk_size=0), r"chunk_size must be a positive integer, got 0", ValueError),
    Case("jit_compile='yes'", "refused", _option(jit_compile="yes"), r"jit_compile must be True, False or None",
         TypeError),
    Case("verbose=-1", "refused", _option(verbose=-1), r"verbose must be an integer >= 0", ValueError),
    Case("bounds of the wrong shape", "refused", _option(bounds=[(np.zeros(2), None), None, None, None]),
         r"bounds for .*kernel: lo has shape \(2,\).*shape \(3, 5\)", ValueError),
    Case("bounds lo > hi", "refused", _option(bounds=(1.0, -1.0)), r"lo > hi", ValueError),
    Case("bounds for no variable", "refused", _option(bounds={"nope": (0, 1)}),
         r"bounds key 'nope' matches no trainable variable", ValueError),
    Case("unknown hvp_mode", "refused", _option(method="trust-ncg", hvp_mode="fast"), r"Unknown hvp_mode 'fast'",
         ValueError),
    Case("unknown hessian", "refused", _option(method="trust-ncg", hessian="bfgs"), r"Unknown hessian 'bfgs'",
         ValueError),
    Case("Gauss-Newton for a method without Hessian", "refused", _option(method="CG", hessian="gauss-newton"),
         r"takes none", ValueError),
    Case("trust radius above its maximum", "refused",
         _option(method="trust-ncg", initial_trust_radius=10.0, max_trust_radius=1.0),
         r"initial_trust_radius=10.0 must be smaller than max_trust_radius=1.0", ValueError),
    Case("trust-region eta out of range", "refused", _option(method="trust-ncg", eta=0.5),
         r"eta must be a number in \[0, 0.25\)", ValueError),
    Case("reduction='none'", "refused", _reduction_none, r"shape \(30,\), not one number.*reduction='none'",
         ValueError),
    Case("ragged inputs", "refused",
         lambda ctx: _fit(ctx, ctx.mlp(), tf.ragged.constant([[1.0, 2.0, 3.0], [1.0, 2.0]]), np.ones((2, 1))),
         r"RaggedTensor.*to_tensor", ValueError),
    Case("inputs that are not numbers", "refused",
         lambda ctx: TensorFlowObjective(ctx.mlp(), np.array([[1, "a", None]] * 4, dtype=object), np.ones((4, 1))),
         r"inputs \(ndarray\) cannot be converted to a tensor", TypeError),
    Case("data above max_data_bytes", "refused",
         lambda ctx: TensorFlowObjective(ctx.mlp(), X, Y, max_data_bytes=100),
         r"needs 960 bytes as dense tensors, more than max_data_bytes=100", ValueError),
    Case("endless .repeat() dataset", "refused", _endless_repeat, r"(endless tf.data.Dataset.*steps_per_epoch|"
         r"infinite dataset, you must specify the number of steps)", ValueError, by_keras=LEGACY),
    Case("endless generator", "refused", _endless_generator, r"without ending.*max_data_bytes=65536.*steps_per_epoch",
         ValueError),
    Case("another model's train function", "refused", _another_model, r"made for model .* but .*fit called it",
         ValueError),
    Case("least squares: loss mae", "refused", lambda ctx: _fit(ctx, ctx.mlp(loss="mae"), X, Y, method="trf"),
         r"mean squared error", NotSquaredErrorError),
    Case("least squares: L1 regularizer", "refused", lambda ctx: _fit(ctx, _l1_model(ctx), X, Y, method="lm"),
         r"only L2", NotSquaredErrorError),
    Case("least squares: add_loss zero at the start", "refused", _lsq_add_loss, r"1 add_loss term.*minimize method",
         NotSquaredErrorError),
    Case("least squares: masked outputs", "refused", _lsq_masked, r"Keras mask.*minimize method",
         NotSquaredErrorError),
    Case("least squares: negative sample weights", "refused",
         lambda ctx: _fit(ctx, ctx.mlp(), X, Y, fit_kwargs=dict(sample_weight=SW - 1.0), method="trf"),
         r"negative sample weights", NotSquaredErrorError),
    Case("least squares: lm with m < n", "refused", lambda ctx: _fit(ctx, ctx.mlp(), X[:10], Y[:10], method="lm"),
         r"10 residuals < 26 weights.*'trf'", ValueError),
    Case("least squares: Jacobian too large", "refused",
         lambda ctx: _fit(ctx, ctx.mlp(), X, Y, method="lm", max_jacobian_bytes=1000),
         r"GiB.*jacobian='operator'", JacobianTooLargeError),
    Case("least squares: diff_step", "refused", _option(method="trf", diff_step=1e-3), r"finite differences.*exact",
         ValueError),
]


# ------------------------------------------------------------------------------ handled
def _chunked_matches(ctx, model, x, y, sw=None):
    """Chunks of 7 rows (with a remainder) give the one-piece value and gradient, and evaluate's value.
    (Whether they fell back to one piece is the table's expected warning.)"""
    chunked = TensorFlowObjective(model, x, y, sw, chunk_size=7)
    whole = TensorFlowObjective(model, x, y, sw, chunk_size=10**6)
    x0 = whole.flat.read()
    np.testing.assert_allclose(chunked.value(x0), full_batch_loss(model, x, y, sw), rtol=1e-5)
    f1, g1 = whole.value_and_grad(x0 + 0.05)
    f2, g2 = chunked.value_and_grad(x0 + 0.05)
    np.testing.assert_allclose(f2, f1, rtol=1e-6)
    np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-6)


def _chunked_reduction(reduction, l2=0.01):
    def run(ctx):
        model = small_mlp(ctx.keras, l2=l2)
        model.compile(loss=ctx.keras.losses.MeanSquaredError(reduction=reduction))
        _chunked_matches(ctx, model, X, Y, SW)

    return run


def _masked_chunked(ctx):
    k = ctx.keras
    model = k.Sequential([k.Input((5, 2)), k.layers.Masking(0.0), k.layers.SimpleRNN(3, return_sequences=True),
                          k.layers.Dense(1)])
    model.compile(loss="mse")
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(30, 5, 2))
    for i, length in enumerate(rng.integers(1, 6, size=30)):
        xs[i, length:] = 0.0
    _chunked_matches(ctx, model, xs, rng.normal(size=(30, 5, 1)))


def _batch_sum_loss(ctx):
    def summed_squares(y_true, y_pred):
        return tf.reduce_sum(tf.square(y_true - y_pred))  # one value for the whole batch

    model = small_mlp(ctx.keras)
    model.compile(loss=summed_squares)
    _chunked_matches(ctx, model, X, Y)


def _add_loss_chunked(ctx):
    k = ctx.keras

    class BatchMeanPenalty(k.layers.Layer):
        def call(self, x):
            self.add_loss(tf.square(tf.reduce_mean(x)))  # a function of the whole batch
            return x

    model = k.Sequential([k.Input((3,)), k.layers.Dense(4), BatchMeanPenalty(), k.layers.Dense(1)])
    model.compile(loss="mse")
    _chunked_matches(ctx, model, X, Y)


def _activity_chunked(ctx):
    k = ctx.keras
    model = k.Sequential([k.Input((3,)), k.layers.Dense(4, activity_regularizer=k.regularizers.L2(0.1)),
                          k.layers.Dense(1)])
    model.compile(loss="mse")
    _chunked_matches(ctx, model, X, Y)


def _compile_after_assign(ctx):
    model = ctx.mlp()
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B")
    model.compile(loss="mse", optimizer="sgd")
    assert model.train_function is None
    model.train_function = train = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=3)
    model.fit(X, Y, verbose=0)
    assert train.result is not None and train.result.nit == 3, "the re-assigned train function runs"


def _sparse(kind):
    def run(ctx):
        model = ctx.mlp()
        sparse = tf.sparse.from_dense(X) if kind == "tf" else scipy.sparse.csr_matrix(X)
        w0 = FlatVariables.from_variables(model.trainable_variables).read()
        train = _fit(ctx, model, sparse, Y, fit_kwargs=dict(batch_size=8), method="L-BFGS-B", maxiter=5)
        assert train.objective.num_samples == 30
        np.testing.assert_allclose(train.result.fun, full_batch_loss(model, X, Y), rtol=1e-6)
        np.testing.assert_allclose(train.objective.value(w0), _loss_at(model, w0, X, Y), rtol=1e-6)

    return run


def _loss_at(model, w, x, y):
    FlatVariables.from_variables(model.trainable_variables).write(w)
    return full_batch_loss(model, x, y)


def _graph_only(ctx):
    k = ctx.keras

    class GraphOnly(k.layers.Layer):
        def call(self, x):
            if tf.executing_eagerly():
                raise RuntimeError("this layer only runs inside tf.function")
            return x

    model = k.Sequential([k.Input((3,)), GraphOnly(), k.layers.Dense(1)])
    model.compile(loss="mse")
    start = full_batch_loss(model, X, Y)
    train = _fit(ctx, model, X, Y, method="L-BFGS-B", maxiter=20)
    np.testing.assert_allclose(train.result.fun, full_batch_loss(model, X, Y), rtol=1e-6)
    assert train.result.fun < start


def _lsq_names(ctx):
    k = ctx.keras
    inp = k.Input((3,))
    b = k.layers.Dense(1, name="b")(inp)  # outputs not in sorted order
    a = k.layers.Dense(1, name="a")(inp)
    model = k.Model(inp, [b, a])
    model.compile(loss={"b": "mse", "a": "mse"}, loss_weights={"b": 1.0, "a": 3.0})
    coef = np.array([[1.0], [-2.0], [0.5]])
    ys = {"b": X @ coef, "a": X @ (2 * coef) + 1.0}
    train = _fit(ctx, model, X, ys, method="trf", xtol=1e-12)
    assert train.result.success, train.result.message
    np.testing.assert_allclose(train.result.fun, full_batch_loss(model, X, ys), rtol=1e-5, atol=1e-10)
    assert train.result.fun < 1e-8, "both outputs fit exactly: weights paired to the right targets"


def _history_counts(ctx):
    model = ctx.mlp()
    train = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=4)
    model.train_function = train
    history = model.fit(X, Y, epochs=2, verbose=0).history
    for key in ("nit", "nfev", "njev", "nhev"):
        assert [type(v) for v in history[key]] == [int, int], (key, history[key])
        assert history[key] == [r[key] for r in train.results]


def _unused_option(ctx):
    train = _fit(ctx, ctx.mlp(), X, Y, method="L-BFGS-B", maxiter=3, xtol=1e-3)
    assert "xtol" not in train.options


def _integral_float_maxiter(ctx):
    train = _fit(ctx, ctx.mlp(), X, Y, method="L-BFGS-B", maxiter=3.0)
    assert train.options["maxiter"] == 3 and isinstance(train.options["maxiter"], int)
    assert train.result.nit == 3


HANDLED = [
    Case("reduction='sum' over chunks", "handled", _chunked_reduction("sum"), ""),
    Case("reduction='mean_with_sample_weight' over chunks", "handled", _chunked_reduction("mean_with_sample_weight"),
         "", keras3_only=True),
    Case("activity regularizer over chunks", "handled", _activity_chunked, ""),
    Case("masked outputs over chunks: one piece", "handled", _masked_chunked, r"one piece.*Keras mask"),
    Case("custom loss summing over the batch: one piece", "handled", _batch_sum_loss,
         r"one piece.*summed_squares.*one value per sample"),
    Case("batch-level add_loss over chunks: one piece", "handled", _add_loss_chunked, r"one piece.*1 add_loss term"),
    Case("compile() after assigning", "handled", _compile_after_assign,
         r"compile\(\) reset model.train_function.*L-BFGS-B.*\(SGD\).*Assign it again"),
    Case("tf.SparseTensor inputs", "handled", _sparse("tf"), ""),
    Case("scipy.sparse inputs", "handled", _sparse("scipy"), ""),
    Case("model that runs in graph mode only", "handled", _graph_only, ""),
    Case("least squares: unsorted output names, dict loss_weights", "handled", _lsq_names, ""),
    Case("history counts are ints", "handled", _history_counts, ""),
    Case("option the method does not use", "handled", _unused_option, r"\['xtol'\] are not used by method.*gtol"),
    Case("maxiter=3.0", "handled", _integral_float_maxiter, ""),
]


# ---------------------------------------------------------------------------- recovered
def _log_model(ctx):
    """y = x log(w), w = 1 at the start: L-BFGS-B's first step lands on w = 0, where the loss is inf."""
    k = ctx.keras

    class LogWeight(k.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(), initializer=k.initializers.Constant(1.0), name="w")

        def call(self, x):
            return x * tf.math.log(self.w)

    model = k.Sequential([k.Input((1,)), LogWeight()])
    model.compile(loss="mse")
    x = np.linspace(0.5, 2.0, 20).reshape(-1, 1)
    return model, x, -3.0 * x


def _meets_inf(method):
    def run(ctx):
        model, x, y = _log_model(ctx)
        return _fit(ctx, model, x, y, method=method, maxiter=50), model, x, y

    return run


def _counter_model(ctx, after, fault):
    """A model whose loss turns NaN (``fault="nan"``) or whose compiled call fails (``"error"``) once it
    has been called ``after`` times (an in-graph counter)."""
    return faulty_model(ctx.keras, after, fault)[0]


def _healed(model):
    """The counter model after the run: its fault switched off, so that evaluate can judge the point kept."""
    model.layers[1].calls.assign(-1e9)
    return model


def _nan_after(ctx):
    model = _counter_model(ctx, after=8, fault="nan")
    train = _fit(ctx, model, X, Y, method="L-BFGS-B", maxiter=100)
    return train, _healed(model), X, Y


def _error_inside(ctx):
    model = _counter_model(ctx, after=8, fault="error")
    train = scipy_optimizer.make_train_function(model, method="BFGS", maxiter=100, jit_compile=False)
    model.train_function = train
    try:
        model.fit(X, Y, verbose=0)
    finally:
        ctx.recovered = (train, _healed(model), X, Y)


def _interrupt_after(method, k=6):
    """A KeyboardInterrupt raised in scipy's evaluation ``k + 1``."""

    def run(ctx):
        model = ctx.mlp()
        train = scipy_optimizer.make_train_function(model, method=method, maxiter=100)
        model.train_function = train
        least_squares = method == "trf"
        owner, name = (LeastSquaresObjective, "residuals") if least_squares else (TensorFlowObjective, "value_and_grad")
        real, calls = getattr(owner, name), {"n": 0}

        def interrupted(obj, x):
            calls["n"] += 1
            if calls["n"] > k + least_squares:  # least squares: one more, the start-point check
                raise KeyboardInterrupt
            return real(obj, x)

        ctx.monkeypatch.setattr(owner, name, interrupted)
        try:
            model.fit(X, Y, verbose=0)
        finally:
            ctx.recovered = (train, model, X, Y)

    return run


def _nan_hessian(ctx):
    """loss = mean((w x - y)^2) + |w|^1.5: finite value and gradient at w = 0, Hessian inf there."""
    k = ctx.keras

    class Cusp(k.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(), initializer="zeros", name="w")

        def call(self, x):
            self.add_loss(tf.pow(tf.abs(self.w), 1.5))
            return x * self.w

    model = k.Sequential([k.Input((1,)), Cusp()])
    model.compile(loss="mse")
    x = np.linspace(0.5, 2.0, 20).reshape(-1, 1)
    return _fit(ctx, model, x, 2 * x, method="trust-exact", maxiter=20), model, x, 2 * x


def _lsq_nan_residuals(ctx):
    model = _counter_model(ctx, after=6, fault="nan")
    train = _fit(ctx, model, X, Y, method="trf", max_nfev=50)
    return train, _healed(model), X, Y


RECOVERED = [
    Case("L-BFGS-B meets an Inf loss", "recovered", _meets_inf("L-BFGS-B"), r"Stopped: the loss is not finite \(inf\)"),
    Case("TNC meets a NaN loss", "recovered", _meets_inf("TNC"), r"Stopped: the loss is not finite \(nan\)"),
    Case("Nelder-Mead meets a NaN loss", "recovered", _meets_inf("Nelder-Mead"), r"Stopped: the loss is not finite"),
    Case("loss turns NaN after 8 model calls", "recovered", _nan_after, r"the loss is not finite \(nan\)"),
    Case("exception inside the compiled call", "recovered", _error_inside,
         r"Stopped by InvalidArgumentError \(.*injected failure", tf.errors.InvalidArgumentError),
    Case("KeyboardInterrupt during L-BFGS-B", "recovered", _interrupt_after("L-BFGS-B"),
         r"Stopped by KeyboardInterrupt", KeyboardInterrupt),
    Case("KeyboardInterrupt during trust-ncg", "recovered", _interrupt_after("trust-ncg"),
         r"Stopped by KeyboardInterrupt", KeyboardInterrupt),
    Case("KeyboardInterrupt during trf", "recovered", _interrupt_after("trf"), r"Stopped by KeyboardInterrupt",
         KeyboardInterrupt),
    Case("trust-exact meets an Inf/NaN Hessian", "recovered", _nan_hessian, r"Stopped: the Hessian is not finite"),
    Case("least squares meets NaN residuals", "recovered", _lsq_nan_residuals,
         r"Stopped: the (residual vector|Jacobian) is not finite"),
]

TABLE = REFUSED + HANDLED + RECOVERED


@pytest.mark.parametrize("case", TABLE, ids=[f"{c.kind}: {c.name}" for c in TABLE])
def test_table(case, keras, monkeypatch, record_property):
    record_property("kind", case.kind)
    if case.keras3_only and LEGACY:
        pytest.skip("a Keras 3 reduction")
    ctx = Ctx(keras)
    ctx.monkeypatch = monkeypatch
    {"refused": _refused, "handled": _handled, "recovered": _recovered}[case.kind](case, ctx, monkeypatch)


def _refused(case, ctx, monkeypatch):
    ScipySpy(monkeypatch, forbid=True)
    with pytest.raises(case.error) as caught:
        case.run(ctx)
    message = str(caught.value)
    assert re.search(case.expect, message, flags=re.DOTALL), f"{case.name}: {message!r}"
    assert isinstance(caught.value, (ValueError, TypeError, RuntimeError))
    innermost = Path(caught.traceback[-1].path)
    owner = "keras" if case.by_keras else "keras_opt_ref"
    assert (PACKAGE in innermost.parents) != case.by_keras, f"{case.name}: raised at {innermost}, not by {owner}"
    for model, before in ctx.models:
        if before is not None:
            for old, new in zip(before, model.get_weights(), strict=True):
                np.testing.assert_array_equal(old, new, err_msg=f"{case.name}: a refused case changed the model")


def _handled(case, ctx, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case.run(ctx)
    messages = [str(w.message) for w in caught]
    if case.expect:
        assert any(re.search(case.expect, m, flags=re.DOTALL) for m in messages), f"{case.name}: {messages}"
    else:  # nothing degraded quietly: no fallback to one piece, no stop
        assert not [m for m in messages if "one piece" in m or "Stopped" in m], f"{case.name}: {messages}"


def _recovered(case, ctx, monkeypatch):
    spy = ScipySpy(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.error is None:
            train, model, x, y = case.run(ctx)
        else:
            with pytest.raises(case.error):
                case.run(ctx)
            train, model, x, y = ctx.recovered
    assert re.search(case.expect, train.result.message), f"{case.name}: {train.result.message!r}"
    if case.error is None:  # a stop, not an exception: it must be visible at run time too
        assert any(issubclass(w.category, RuntimeWarning) and "Stopped" in str(w.message) for w in caught)
    assert_recovered(train, model, x, y, spy)
