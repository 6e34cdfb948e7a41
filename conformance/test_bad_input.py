"""5. Bad input: refused on purpose, before any work, with a message naming the problem.

Each check has a positive control: the implementation must first fit the otherwise identical
valid problem. A refusal is a ValueError/TypeError/RuntimeError raised before any
scipy.optimize call, whose message names the problem; an AttributeError, KeyError, a
TensorFlow op error or any other crash is reported as a crash, not as a refusal. So an
implementation whose fit always raises fails every check here.
"""

from __future__ import annotations

import numpy as np
import pytest

from .expect import expect_refusal, fit, fit_ok
from .problems import mlp, regression


def _compiled(keras):
    model = mlp(keras)
    model.compile(loss="mse")
    return model


def _refused(impl, observe, keras, *, problem, keywords, bad, good):
    """``good()`` must fit; then ``bad()`` must be refused. Both build their own models."""
    good()
    observe.last  # noqa: B018 -- raises NotObserved if the valid twin reached scipy by a route the suite cannot see
    return expect_refusal(bad, problem=problem, keywords=keywords, observe=observe)


def test_not_compiled(impl, observe, keras):
    X, y = regression()
    _refused(impl, observe, keras, problem="a model that was never compiled", keywords=("compile",),
             bad=lambda: fit(impl, mlp(keras), X, y), good=lambda: fit_ok(impl, _compiled(keras), X, y))


def test_unknown_method(impl, observe, keras):
    X, y = regression()
    message = _refused(impl, observe, keras, problem="method='no-such-method'", keywords=("no-such-method", "method"),
                       bad=lambda: fit(impl, _compiled(keras), X, y, method="no-such-method"),
                       good=lambda: fit_ok(impl, _compiled(keras), X, y, method="L-BFGS-B"))
    if "L-BFGS-B" not in message:
        if observe.warnings:  # scipy's own refusal at its entry: correct, but it does not list the methods
            observe.warn(f"scipy's own message does not list the valid methods: {message!r}")
        else:
            raise AssertionError(f"the message should list the valid methods: {message!r}")


@pytest.mark.parametrize("where", ["inputs", "targets", "sample weights"])
def test_non_finite_data(impl, observe, keras, where):
    X, y = regression(n=20)
    sw = np.ones(20)

    def bad():
        Xb, yb, swb = X.copy(), y.copy(), sw.copy()
        {"inputs": Xb, "targets": yb, "sample weights": swb}[where][2] = np.inf
        return fit(impl, _compiled(keras), Xb, yb, sample_weight=swb)

    _refused(impl, observe, keras, problem=f"an Inf in the {where}", keywords=("nan", "inf", "finite"),
             bad=bad, good=lambda: fit_ok(impl, _compiled(keras), X, y, sample_weight=sw))


def test_empty_data(impl, observe, keras):
    X, y = regression(n=20)
    try:  # Keras's own fit, with its own train function: does it reach a train function at all?
        _compiled(keras).fit(np.zeros((0, 3)), np.zeros((0, 1)), verbose=0)
    except (StopIteration, ValueError) as exc:
        backend = keras.backend.backend()
        pytest.skip(f"Keras's own fit on the {backend} backend raises {type(exc).__name__} on an empty training set "
                    f"({exc or 'while building the loss'}) before any train function is called: nothing to refuse")
    _refused(impl, observe, keras, problem="an empty training set (0 samples)",
             keywords=("empty", "0 samples", "no data", "no training data", "no sample", "no batch"),
             bad=lambda: fit(impl, _compiled(keras), np.zeros((0, 3)), np.zeros((0, 1))),
             good=lambda: fit_ok(impl, _compiled(keras), X, y))


def test_low_precision(impl, observe, keras):
    X, y = regression()

    def model(dtype):
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, dtype=dtype)])
        m.compile(loss="mse")
        return m

    _refused(impl, observe, keras, problem="a mixed_float16 layer", keywords=("float16", "precision"),
             bad=lambda: fit(impl, model("mixed_float16"), X, y), good=lambda: fit_ok(impl, model("float32"), X, y))


@pytest.mark.level("bounds", method="CG")
def test_bounds_for_unbounded_method(impl, observe, keras):
    X, y = regression()
    _refused(impl, observe, keras, problem="bounds with method='CG', which ignores them", keywords=("bound",),
             bad=lambda: fit(impl, _compiled(keras), X, y, method="CG", make_kwargs=dict(bounds=(0, 1))),
             good=lambda: fit_ok(impl, _compiled(keras), X, y, method="L-BFGS-B", make_kwargs=dict(bounds=(0, 1))))


def test_embedding_index_out_of_range(impl, observe, keras):
    """Keras raises on an id >= input_dim; XLA would silently clamp it. Either way: refuse, with a message."""

    def model():
        m = keras.Sequential([keras.Input((1,), dtype="int32"), keras.layers.Embedding(5, 2), keras.layers.Flatten(),
                              keras.layers.Dense(1)])
        m.compile(loss="mse")
        return m

    good_ids = np.array([[0], [4], [3], [1]], dtype="int32")
    bad_ids = np.array([[0], [4], [7], [1]], dtype="int32")
    _refused(impl, observe, keras, problem="an Embedding id (7) outside [0, input_dim=5)",
             keywords=("index", "indices", "range", "input_dim", "embedding", " id"),
             bad=lambda: fit(impl, model(), bad_ids, np.ones((4, 1)), batch_size=4),
             good=lambda: fit_ok(impl, model(), good_ids, np.ones((4, 1)), batch_size=4))


@pytest.mark.parametrize("maxiter", [-1, 2.5], ids=["negative", "fractional"])
def test_invalid_maxiter(impl, observe, keras, maxiter):
    X, y = regression()
    _refused(impl, observe, keras, problem=f"maxiter={maxiter!r}", keywords=("maxiter",),
             bad=lambda: fit(impl, _compiled(keras), X, y, maxiter=maxiter),
             good=lambda: fit_ok(impl, _compiled(keras), X, y, maxiter=3))


@pytest.mark.level("least_squares", method="trf")
def test_least_squares_with_a_loss_that_is_not_squared(impl, observe, keras):
    """Least squares minimizes r.r: with loss='mae' no residual vector has r.r equal to Keras's loss."""
    X, y = regression()

    def model(loss):
        m = mlp(keras)
        m.compile(loss=loss)
        return m

    _refused(impl, observe, keras, problem="method='trf' (least squares) on a model compiled with loss='mae'",
             keywords=("squared", "mse", "mae", "absolute", "least squares", "least-squares"),
             bad=lambda: fit(impl, model("mae"), X, y, method="trf"),
             good=lambda: fit_ok(impl, model("mse"), X, y, method="trf"))
