"""4. The fit contract: one optimization per epoch; history; where the weights end up; counts; failures.

"Where the weights end up" is checked against what scipy itself returned (``result.x``) and
against every value scipy saw during the run (recorded by the observer), never against the
implementation's own account.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from . import probes
from .expect import close_scalar, fit, fit_ok, fitted_call, history_value
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
    missing = [k for k in ("loss", "mae", "val_loss", "val_mae") if k not in h or len(h[k]) != 2]
    assert not missing, f"history lacks one value per epoch (2 epochs) for {missing}; it has {sorted(h)}"


@pytest.mark.level("extras")
def test_history_has_the_counts(impl, observe, keras):
    X, y = regression(n=60)
    model = mlp(keras)
    model.compile(loss="mse")
    history, _ = fitted_call(impl, observe, model, X, y, maxiter=10, epochs=2, batch_size=8)
    h = history.history
    present = [k for k in COUNTS if k in h]
    wrong = [k for k in present if len(h[k]) != 2]
    assert not wrong, f"history has {wrong} but not one value per epoch (2 epochs): { {k: h[k] for k in wrong} }"
    for key in present:
        for epoch in range(2):
            _whole(h[key][epoch], f"history[{key!r}][{epoch}]")
    if len(present) < len(COUNTS):
        observe.warn(f"history has the counts {present} but not {[k for k in COUNTS if k not in present]}")


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


def _written_back(impl, observe, keras, method, maxiter, how):
    """fit, with one more evaluation (at a worse point) after scipy returns: the weights must be result.x (or a
    point scipy evaluated with a lower loss), not the last point evaluated, not the start."""
    X, y = regression(n=40)
    model = mlp(keras)
    model.compile(loss="mse")
    observe.evaluate_after_return = True
    _, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=maxiter)
    if call.final_x is None:
        raise NotObserved(f"{method}: scipy returned nothing the suite could read ({call.describe()})")
    named = probes.named_points(call)
    weights = trainable_vector(model)
    if probes.points_equal(weights, call.final_x):
        return
    best = named["the best point evaluated"]
    if probes.points_equal(weights, best) and keras_loss(model, X, y) <= keras_loss_at(model, call.final_x, X, y):
        return  # a point scipy evaluated with a lower loss than its own x: keeping it is allowed
    raise AssertionError(
        f"{method} ({how}): the model's weights after fit equal {probes.where(weights, named)}, not scipy's result.x "
        f"(max |weights - result.x| = {np.max(np.abs(weights - call.final_x)):.3g}). The last point evaluated is one "
        "the suite evaluated after scipy returned, as scipy's methods may, so it is neither result.x nor the best: "
        "fit must write result.x back into the model, whatever point was evaluated last.")


@pytest.mark.parametrize("method", ["L-BFGS-B", "Nelder-Mead", "trust-ncg"])
def test_weights_equal_result_x(impl, observe, keras, method):
    _written_back(impl, observe, keras, method, 20, "maxiter=20")


def test_weights_written_back_when_scipy_stops_early(impl, observe, keras):
    """scipy reports success=False when maxiter stops it; its x is still the best it has."""
    _written_back(impl, observe, keras, "L-BFGS-B", 2, "stopped by maxiter=2, success=False")


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


@pytest.mark.level("extras")
@pytest.mark.parametrize("method", ["BFGS", "trust-ncg", "Nelder-Mead"])
def test_counts_match_observed_calls(impl, observe, keras, method):
    """History's nfev/njev/nhev are what scipy really asked for (counted by the suite), nit what scipy reports."""
    X, y = regression(n=40)
    model = mlp(keras)
    model.compile(loss="mse")
    history, call = fitted_call(impl, observe, model, X, y, method=method, maxiter=15)
    counts, logged = call.counts, history.history
    absent = [k for k in COUNTS if k not in logged]
    if absent:  # which counts to keep is the implementation's choice; the ones it keeps must be right
        observe.warn(f"history has no {absent}")
    if "nfev" in logged:
        nfev = _whole(history_value(history, "nfev"), "history['nfev']")
        assert nfev == counts.get("fun", 0), (
            f"{method}: history nfev = {nfev}, but scipy called fun {counts.get('fun')} times"
        )
    if "nhev" in logged:
        nhev = _whole(history_value(history, "nhev"), "history['nhev']")
        observed = counts.get("hessp", 0) + counts.get("hess", 0)
        assert nhev == observed, f"{method}: history nhev = {nhev}, but scipy called hess/hessp {observed} times"
    if call.gradient_route == "callable" and "njev" in logged:
        njev = _whole(history_value(history, "njev"), "history['njev']")
        assert njev == counts.get("jac", 0), f"{method}: history njev = {njev}, scipy called jac {counts.get('jac')}"
    if call.iterations is not None and "nit" in logged:
        nit = _whole(history_value(history, "nit"), "history['nit']")
        assert nit == call.iterations, f"{method}: history nit = {nit}, but scipy reports nit = {call.iterations}"


def _best_seen(call) -> float:
    finite = [f for _, f in call.evaluated if math.isfinite(f)]
    if not finite:
        raise NotObserved(f"scipy saw no finite loss during the run ({call.describe()})")
    return min(finite)


def test_interrupt_keeps_the_best_point(impl, observe, keras):
    """Ctrl-C during the run: at scipy's 8th objective call the suite first evaluates a point worse than the best
    so far (as a rejected trial step is), then raises KeyboardInterrupt. The last point evaluated, the best point
    and the start are three different points; the model must be left at the best."""
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
    _best_seen(call)  # NotObserved if scipy saw no finite value
    named = {k: v for k, v in probes.named_points(call).items() if k != "result.x (scipy's returned point)"}
    if not probes.distinct(named):
        raise NotObserved(f"the interrupted run's last, best and start points coincide; nothing to tell apart: {named}")
    best_x = named["the best point evaluated"]
    if probes.points_equal(weights, best_x):
        return
    final, best = keras_loss(model, X, y), keras_loss_at(model, best_x, X, y)
    if final <= best * (1 + 1e-5):
        return  # as good as the best point scipy saw (Keras's loss at both)
    raise AssertionError(
        f"Keras's loss at the weights left after the interrupt is {final:.6g}, but at the best point scipy saw before "
        f"it the loss is {best:.6g}: the weights equal {probes.where(weights, named)}. An interrupted run must leave "
        "the best point found (keep it as the run goes; restore it when the run ends by an exception).")


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
        f"after meeting NaN losses the model is at loss {final:.6g} (its weights equal "
        f"{probes.where(weights, probes.named_points(call))}), but scipy saw a finite loss of {best:.6g}: a failed run "
        "must leave the model at the best finite point evaluated"
    )


@pytest.mark.parametrize("how", ["steps_per_epoch", "steps_per_execution"])
def test_every_epoch_runs_on_its_whole_data(impl, observe, keras, how):
    """Three epochs where Keras keeps state across them: one iterator for all epochs (a repeated tf.data dataset
    with steps_per_epoch = one pass), or several train-function calls per epoch (steps_per_execution=3, 7 steps).
    Each epoch is one run whose values, as scipy saw them, are the loss over the whole data."""
    X, y = regression(n=50)
    model = mlp(keras)
    if how == "steps_per_epoch":
        tf = pytest.importorskip("tensorflow", reason="a repeated tf.data dataset needs TensorFlow")
        model.compile(loss="mse")
        data = (tf.data.Dataset.from_tensor_slices((X, y)).batch(16).repeat(),)
        kwargs = dict(steps_per_epoch=4)  # 16 + 16 + 16 + 2 rows: one pass per epoch, one iterator for all three
        setting = "one repeated tf.data iterator across epochs, steps_per_epoch=4 (one pass of 50 rows)"
    else:
        if getattr(keras.backend, "backend", lambda: "tensorflow")() == "torch":
            pytest.skip("Keras's torch backend refuses steps_per_execution > 1 in its own fit and evaluate")
        model.compile(loss="mse", steps_per_execution=3)
        data, kwargs = (X, y), dict(batch_size=8)
        setting = "compile(steps_per_execution=3), batches of 8: 7 steps, 3 train-function calls per epoch"
    fitted_call(impl, observe, model, *data, maxiter=5, epochs=3, **kwargs)
    runs = observe.calls
    assert len(runs) == 3, (
        f"{len(runs)} scipy run(s) for 3 epochs ({setting}): expected one optimization per epoch. Keras keeps state "
        "across these epochs (the same iterator object, or several calls per epoch); an epoch must be recognised "
        "by fit's own epoch, not by a new iterator or a call count")
    for e, call in enumerate(runs):
        if not call.evaluated:
            raise AssertionError(f"epoch {e + 1}: scipy saw no objective value ({call.describe()})")
        x, f = call.evaluated[0]
        close_scalar(f, keras_loss_at(model, x, X, y), rtol=1e-5, what=f"epoch {e + 1}: the first value scipy saw",
                     truth="model.evaluate on the whole data at that x",
                     why=f"the epoch's objective is not the loss over the epoch's whole data ({setting})")


def test_x0_is_read_from_the_model_at_every_fit(impl, observe, keras):
    """Weights the user set between two fits (set_weights, a loaded checkpoint) are where the next run starts."""
    X, y = regression(n=40)
    model = mlp(keras)
    model.compile(loss="mse")
    fitted_call(impl, observe, model, X, y, maxiter=5)
    moved = [w + 0.3 for w in model.get_weights()]
    model.set_weights(moved)
    expected = trainable_vector(model)
    fitted_call(impl, observe, model, X, y, maxiter=5)
    x0 = observe.calls[-1].x0
    if not probes.points_equal(x0, expected):
        first = observe.calls[0]
        where = probes.where(x0, {"the first run's result.x": first.final_x, "the first run's start": first.x0})
        raise AssertionError(f"the second fit's x0 is not the weights the user set before it (model.set_weights): it "
                             f"equals {where}. x0 must be read from the model at the start of every run.")
