"""4. The fit contract: epochs, history, weights, callbacks, counts."""

from __future__ import annotations

import numpy as np

from .problems import fit, mlp, regression
from .truth import keras_loss, trainable_vector

COUNTS = ("nit", "nfev", "njev", "nhev")


def test_one_optimization_per_epoch_and_history(impl, observe, keras):
    X, y = regression(n=60)
    Xv, yv = regression(n=20, seed=5)
    model = mlp(keras)
    model.compile(loss="mse", metrics=["mae"])
    epochs_seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            epochs_seen.append(dict(logs or {}))

    history = fit(impl, model, X, y, maxiter=10, epochs=3, batch_size=8, validation_data=(Xv, yv),
                  callbacks=[Record()])
    assert len(observe.calls) == 3, f"{len(observe.calls)} scipy runs for 3 epochs (batch_size=8: 8 steps each)"
    h = history.history
    for key in ("loss", "mae", "val_loss", "val_mae", *COUNTS):
        assert key in h and len(h[key]) == 3, f"history[{key!r}] missing or not one per epoch: {sorted(h)}"
    assert len(epochs_seen) == 3 and all("loss" in logs for logs in epochs_seen), "callbacks did not see the logs"
    result = observe.last.result
    np.testing.assert_allclose(h["loss"][-1], keras_loss(model, X, y), rtol=1e-5, err_msg="history loss")
    np.testing.assert_allclose(h["val_loss"][-1], keras_loss(model, Xv, yv), rtol=1e-5)
    for key in ("nit", "nfev"):
        assert h[key][-1] == result.get(key, 0), f"history {key} {h[key][-1]} != scipy's {result.get(key)}"


def test_weights_equal_result_x(impl, observe, keras):
    X, y = regression(n=40)
    model = mlp(keras)
    model.compile(loss="mse")
    fit(impl, model, X, y, maxiter=20)
    x = np.asarray(observe.last.result.x, dtype=np.float64)
    np.testing.assert_allclose(trainable_vector(model), x, rtol=1e-6, atol=1e-7,
                               err_msg="model weights after fit != the OptimizeResult's x")


def test_non_trainable_weights_untouched(impl, observe, keras):
    X, y = regression(n=40)
    model = mlp(keras)
    model.layers[0].trainable = False
    model.compile(loss="mse")
    frozen = [w.copy() for w in model.layers[0].get_weights()]
    n_trainable = trainable_vector(model).size
    fit(impl, model, X, y, maxiter=20)
    assert observe.last.x0.size == n_trainable, "x includes weights that are not trainable"
    for before, after in zip(frozen, model.layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(before, after, err_msg="a non-trainable weight changed")


def test_counts_consistent_with_observed_calls(impl, observe, keras):
    """nfev/nhev in history are what scipy really asked for (counted by the suite)."""
    X, y = regression(n=40)
    for method in ("BFGS", "trust-ncg"):
        model = mlp(keras)
        model.compile(loss="mse")
        history = fit(impl, model, X, y, method=method, maxiter=15)
        counts = observe.last.counts
        h = history.history
        assert h["nfev"][-1] == counts["fun"], f"{method}: history nfev {h['nfev'][-1]}, scipy called fun {counts}"
        if method == "trust-ncg":
            observed = counts.get("hessp", 0) + counts.get("hess", 0)
            assert h["nhev"][-1] == observed, f"{method}: history nhev {h['nhev'][-1]}, observed {observed}"
