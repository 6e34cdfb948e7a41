"""4. The fit contract: one optimization per epoch; history; where the weights end up; counts; failures.

"Where the weights end up" is checked against what scipy itself returned (``result.x``) and
against every value scipy saw during the run (recorded by the observer), never against the
implementation's own account.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from .expect import close_scalar, close_vector, fit, fit_ok, fitted_call, history_value
from .problems import mlp, nan_region_model, regression
from .spy import NotObserved
from .truth import keras_loss, keras_loss_at, trainable_vector, weights_set_to

COUNTS = ("nit", "nfev", "njev", "nhev")


def _whole(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AssertionError(f"{what} = {value!r} is not a count") from None
    assert number == int(number) and number >= 0, f"{what} = {value!r} is not a count"
    return int(number)


def test_one_optimization_per_epoch(impl, observe, keras):
    X, y = regression(n=60)
    model = mlp(keras)
    model.compile(loss="mse")
    epochs_seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            epochs_seen.append(dict(logs or {}))

    fitted_call(impl, observe, model, X, y, maxiter=10, epochs=3, batch_size=8, callbacks=[Record()])
    assert len(observe.calls) == 3, (
        f"{len(observe.calls)} scipy runs for 3 epochs of 8 steps each (batch_size=8, 60 samples): expected one "
        "optimization per epoch over the whole data"
    )
    assert len(epochs_seen) == 3 and all("loss" in logs for logs in epochs_seen), (
        f"callbacks' on_epoch_end saw {epochs_seen}: expected each of the 3 epochs to log 'loss'"
    )


def test_history_has_every_key(impl, observe, keras):
    X, y = regression(n=60)
    Xv, yv = regression(n=20, seed=5)
    model = mlp(keras)
    model.compile(loss="mse", metrics=["mae"])
    history, _ = fitted_call(impl, observe, model, X, y, maxiter=10, epochs=2, batch_size=8, validation_data=(Xv, yv))
    h = history.history
    missing = [k for k in ("loss", "mae", "val_loss", "val_mae", *COUNTS) if k not in h or len(h[k]) != 2]
    assert not missing, f"history lacks one value per epoch (2 epochs) for {missing}; it has {sorted(h)}"
    for key in COUNTS:
        for epoch in range(2):
            _whole(h[key][epoch], f"history[{key!r}][{epoch}]")


def test_history_loss_and_metrics_at_the_final_weights(impl, observe, keras):
    X, y = regression(n=60)
    Xv, yv = regression(n=20, seed=5)
    model = mlp(keras)
    model.compile(loss="mse", metrics=["mae"])
    history, call = fitted_call(impl, observe, model, X, y, maxiter=10, batch_size=8, validation_data=(Xv, yv))
    evaluated = [f for _, f in call.evaluated if math.isfinite(f)]
    known = {"the mean of all losses evaluated during the run": float(np.mean(evaluated)) if evaluated else math.nan,
             "the loss at the start weights": keras_loss_at(model, call.x0, X, y)}
    close_scalar(history_value(history, "loss"), keras_loss(model, X, y), rtol=1e-5, what="history['loss']",
                 truth="model.evaluate at the final weights", why="the epoch's loss must be the loss where fit ended",
                 known=known)
    final = model.evaluate(X, y, batch_size=len(X), verbose=0, return_dict=True)
    start = _metrics_at(model, call.x0, X, y)
    close_scalar(history_value(history, "mae"), final["mae"], rtol=1e-5, what="history['mae']",
                 truth="model.evaluate's mae at the final weights", why="metrics must be computed where fit ended",
                 known={"the mae at the start weights": start["mae"]})
    close_scalar(history_value(history, "val_loss"), keras_loss(model, Xv, yv), rtol=1e-5, what="history['val_loss']",
                 truth="model.evaluate on validation_data at the final weights", why="validation runs after the run")


def _metrics_at(model, w, X, y):
    with weights_set_to(model, w):
        return model.evaluate(X, y, batch_size=len(X), verbose=0, return_dict=True)


@pytest.mark.parametrize("method", ["L-BFGS-B", "Nelder-Mead", "trust-ncg"])
def test_weights_equal_result_x(impl, observe, keras, method):
    X, y = regression(n=40)
    model = mlp(keras)
    model.compile(loss="mse")
    _, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=20)
    x = call.final_x
    if x is None:
        raise NotObserved(f"{method}: scipy returned nothing the suite could read ({call.describe()})")
    last = call.evaluated[-1][0] if call.evaluated else None
    close_vector(trainable_vector(model), x, rtol=1e-6, atol=1e-7, what="the model's weights after fit",
                 truth="the x scipy returned", why="fit must leave the model at scipy's result",
                 known={"the last point scipy evaluated": last} if last is not None else None)


def test_weights_written_back_when_scipy_stops_early(impl, observe, keras):
    """scipy reports success=False when maxiter stops it; its x is still the best it has."""
    X, y = regression(n=40)
    model = mlp(keras)
    model.compile(loss="mse")
    _, call = fitted_call(impl, observe, model, X, y, method="L-BFGS-B", maxiter=2)
    close_vector(trainable_vector(model), call.final_x, rtol=1e-6, atol=1e-7, what="the model's weights after fit",
                 truth="scipy's x after it stopped at maxiter=2 (success=False)",
                 why="the result must be written back even when scipy reports no convergence",
                 known={"the start weights": call.x0})


def test_non_trainable_weights_untouched(impl, observe, keras):
    X, y = regression(n=40)
    model = mlp(keras)
    model.layers[0].trainable = False
    model.compile(loss="mse")
    frozen = [w.copy() for w in model.layers[0].get_weights()]
    n_trainable = trainable_vector(model).size
    _, call = fitted_call(impl, observe, model, X, y, maxiter=20)
    assert call.x0.size == n_trainable, (
        f"x0 has {call.x0.size} entries but the model has {n_trainable} trainable weights: x includes weights "
        "that are not trainable"
    )
    for before, after in zip(frozen, model.layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(before, after, err_msg="a non-trainable weight changed during fit")


@pytest.mark.parametrize("method", ["BFGS", "trust-ncg", "Nelder-Mead"])
def test_counts_match_observed_calls(impl, observe, keras, method):
    """History's nfev/njev/nhev are what scipy really asked for (counted by the suite), nit what scipy reports."""
    X, y = regression(n=40)
    model = mlp(keras)
    model.compile(loss="mse")
    history, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=15)
    counts = call.counts
    nfev = _whole(history_value(history, "nfev"), "history['nfev']")
    assert nfev == counts.get("fun", 0), (
        f"{method}: history nfev = {nfev}, but scipy called fun {counts.get('fun')} times"
    )
    nhev = _whole(history_value(history, "nhev"), "history['nhev']")
    observed = counts.get("hessp", 0) + counts.get("hess", 0)
    assert nhev == observed, f"{method}: history nhev = {nhev}, but scipy called hess/hessp {observed} times"
    if call.gradient_route == "callable":
        njev = _whole(history_value(history, "njev"), "history['njev']")
        assert njev == counts.get("jac", 0), f"{method}: history njev = {njev}, scipy called jac {counts.get('jac')}"
    if call.iterations is not None:
        nit = _whole(history_value(history, "nit"), "history['nit']")
        assert nit == call.iterations, f"{method}: history nit = {nit}, but scipy reports nit = {call.iterations}"


def _best_seen(call) -> float:
    finite = [f for _, f in call.evaluated if math.isfinite(f)]
    if not finite:
        raise NotObserved(f"scipy saw no finite loss during the run ({call.describe()})")
    return min(finite)


def test_interrupt_keeps_the_best_point(impl, observe, keras):
    """Ctrl-C during the run (a KeyboardInterrupt from scipy's 8th objective call): the best point seen is kept."""
    X, y = regression(n=40)
    control = mlp(keras)
    control.compile(loss="mse")
    fit_ok(impl, control, X, y, method="L-BFGS-B", maxiter=50)  # the same run, uninterrupted, must work
    model = mlp(keras)
    model.compile(loss="mse")
    observe.interrupt_at = 8  # counted per scipy call: the interrupted run's 8th objective call
    try:
        fit(impl, model, X, y, method="L-BFGS-B", maxiter=50)
    except KeyboardInterrupt:
        pass  # re-raising the user's interrupt is fine; so is returning
    except Exception as exc:
        raise AssertionError(f"after a KeyboardInterrupt, fit raised {type(exc).__name__}: {exc}") from exc
    call = observe.last
    assert call.counts.get("fun", 0) >= 8, f"scipy made {call.counts.get('fun')} objective calls; the interrupt is at 8"
    weights = trainable_vector(model)
    assert np.all(np.isfinite(weights)), "the model holds non-finite weights after an interrupted run"
    best = _best_seen(call)
    close_scalar(keras_loss(model, X, y), best, rtol=1e-5, what="Keras's loss at the weights left after the interrupt",
                 truth="the lowest loss scipy saw before it", why="an interrupted run must leave the best point found",
                 known={"the loss at the start weights": keras_loss_at(model, call.x0, X, y),
                        "the loss at the last point evaluated": call.evaluated[-1][1]})


def test_nan_loss_keeps_the_best_finite_point(impl, observe, keras):
    """The loss is NaN beyond a radius that the optimum lies outside: the model must end at the best finite point."""
    X, _ = regression(n=40)
    y = X @ np.full((3, 1), 3.0)
    control = nan_region_model(keras, radius=100.0)  # the same problem where no NaN is in reach must fit
    control.compile(loss="mse")
    fit_ok(impl, control, X, y, method="L-BFGS-B", maxiter=50)
    model = nan_region_model(keras)
    model.compile(loss="mse")
    try:
        fit(impl, model, X, y, method="L-BFGS-B", maxiter=50)
    except Exception:  # noqa: S110 -- stopping with an error on a NaN loss is allowed; what is left is checked
        pass
    call = observe.last
    weights = trainable_vector(model)
    assert np.all(np.isfinite(weights)), f"the model holds non-finite weights {weights} after meeting a NaN loss"
    final = keras_loss(model, X, y)
    best = _best_seen(call)
    assert math.isfinite(final) and final <= best * (1 + 1e-5), (
        f"after meeting NaN losses the model is at loss {final:.6g}, but scipy saw a finite loss of {best:.6g}: "
        "a failed run must leave the model at the best finite point evaluated"
    )
