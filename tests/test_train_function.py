"""make_train_function through model.fit: methods, history, callbacks, verbose, bounds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
from conftest import full_batch_loss, regression, small_mlp

from keras_opt_ref import METHODS, scipy_optimizer
from keras_opt_ref.bench import workloads
from keras_opt_ref.train.methods import MINIMIZE_TABLE as METHOD_TABLE
from keras_opt_ref.train.methods import resolve_method

GRADIENT_METHODS = [m.name for m in METHOD_TABLE if m.jac]
# Iteration budgets and tolerances for the README regression. Methods whose default
# stopping rule is loose get a tighter one; this is about their reaching the optimum.
README_SETTINGS = {
    "TNC": dict(maxiter=500, ftol=1e-14, gtol=1e-10),
    "SLSQP": dict(maxiter=200, ftol=1e-14),
    "CG": dict(maxiter=100, gtol=1e-9),
    "BFGS": dict(maxiter=100, gtol=1e-9),
    "L-BFGS-B": dict(maxiter=100, ftol=1e-15, gtol=1e-10),
}


def _readme_model(keras):
    model = workloads.linear_model(keras, 4, use_bias=False)
    model.compile(loss="mse")
    return model


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_readme_regression_every_gradient_method(keras, method):
    X, y = workloads.readme_regression()
    model = _readme_model(keras)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy warning about unused jac/hess/hessp or options
        model.train_function = scipy_optimizer.make_train_function(
            model, method=method, **README_SETTINGS.get(method, dict(maxiter=100))
        )
        model.fit(X, y, verbose=0)
    np.testing.assert_allclose(model.get_weights()[0].ravel(), [1, 2, 3, 4], atol=1e-3, err_msg=method)


def test_readme_usage_lines(keras):
    """The three keras-opt usage lines, verbatim but for the import.

    Two epochs: CG needs about 29 iterations on this ill-conditioned problem, and each
    epoch runs at most ``maxiter`` (a CG restart from where the first epoch stopped).
    """
    X, y = workloads.readme_regression()
    for kwargs in (
        dict(maxiter=20),
        dict(method="trust-ncg", maxiter=20),
        dict(method="trust-ncg", maxiter=100, gtol=1e-5, xtol=1e-8),
    ):
        model = _readme_model(keras)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.train_function = scipy_optimizer.make_train_function(model, **kwargs)
        if "xtol" in kwargs:
            assert any("xtol" in str(w.message) and "gtol" in str(w.message) for w in caught), (
                "an option trust-ncg does not use must be reported, naming the ones it uses"
            )
        model.fit(X, y, epochs=2, verbose=0)
        np.testing.assert_allclose(model.get_weights()[0].ravel(), [1, 2, 3, 4], atol=1e-3, err_msg=str(kwargs))
    assert model.train_function.method.name == "trust-ncg"


def test_default_method_is_cg_and_names_are_case_insensitive(keras):
    model = _readme_model(keras)
    assert scipy_optimizer.make_train_function(model).method.name == "CG"
    assert scipy_optimizer.make_train_function(model, method="l-bfgs-b").method.name == "L-BFGS-B"
    assert scipy_optimizer.make_train_function(model, method="TRUST-KRYLOV").method.name == "trust-krylov"
    assert set(METHODS) == {m.name for m in METHOD_TABLE} and len(METHODS) == 15


@pytest.mark.parametrize("method", [m.name for m in METHOD_TABLE])
def test_each_method_gets_exactly_its_derivatives(keras, method, monkeypatch):
    seen = {}
    real = scipy.optimize.minimize

    def spy(fun, x0, **kwargs):
        seen.update(kwargs)
        return real(fun, x0, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", spy)
    X, y = workloads.readme_regression()
    model = _readme_model(keras)
    start_loss = full_batch_loss(model, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=10)
        history = model.fit(X, y, verbose=0)
    spec = resolve_method(method)
    assert (seen.get("jac") is True) == spec.jac, "gradient handed over iff the method uses it"
    assert ("hessp" in seen) == (spec.hess == "hessp")
    assert ("hess" in seen) == (spec.hess == "hess")
    assert history.history["loss"][-1] <= start_loss * (1 + 1e-12), "ended above the starting loss"


def test_solver_options_match_scipy(keras):
    """Every option in the table is one scipy accepts for that method (no 'Unknown solver options')."""
    fun = scipy.optimize.rosen
    for method in METHOD_TABLE:
        for option in sorted(method.options - {"disp", "iprint", "verbose", "return_all", "workers"}):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    scipy.optimize.minimize(
                        fun, np.zeros(2), method=method.name, jac=scipy.optimize.rosen_der if method.jac else None,
                        hess=scipy.optimize.rosen_hess if method.hess else None, options={option: None},
                    )
                except Exception:  # a None value may be invalid; only the unknown-option warning matters
                    pass
            unknown = [w for w in caught if "Unknown solver options" in str(w.message)]
            assert not unknown, f"{method.name}: scipy does not know option {option!r}"


def test_history_metrics_validation_and_counts(keras):
    X, y = regression(n=60)
    Xv, yv = regression(n=20, seed=7)
    model = small_mlp(keras)
    model.compile(loss="mse", metrics=["mae"])
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=15)
    history = model.fit(X, y, epochs=3, batch_size=16, validation_data=(Xv, yv), verbose=0)
    h = history.history
    for key in ("loss", "mae", "val_loss", "val_mae", "nit", "nfev", "njev", "nhev"):
        assert key in h and len(h[key]) == 3, (key, h.keys())
    assert h["loss"][2] <= h["loss"][0]
    assert all(0 < nit <= 15 for nit in h["nit"])
    result = model.train_function.result
    assert isinstance(result, scipy.optimize.OptimizeResult) and "success" in result and "message" in result
    assert len(model.train_function.results) == 3
    assert h["nfev"][-1] == result.nfev and h["nit"][-1] == result.nit
    # Final logs describe the model as it is after fit.
    np.testing.assert_allclose(h["loss"][-1], full_batch_loss(model, X, y), rtol=1e-6)
    mae = float(np.mean(np.abs(model.predict(X, verbose=0) - y)))
    np.testing.assert_allclose(h["mae"][-1], mae, rtol=1e-5)
    np.testing.assert_allclose(h["val_loss"][-1], full_batch_loss(model, Xv, yv), rtol=1e-5)
    np.testing.assert_array_equal(model.train_function.objective.flat.read(), result.x)


def test_one_optimization_per_epoch_and_no_extra_work(keras):
    X, y = regression(n=50)
    model = small_mlp(keras)
    model.compile(loss="mse")
    train = scipy_optimizer.make_train_function(model, method="BFGS", maxiter=10)
    model.train_function = train
    calls = []
    original = train.run

    def counting_run(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    train.run = counting_run
    seen_logs = []
    cb = _callback(keras, seen_logs)
    model.fit(X, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert len(calls) == 2, "one optimization per epoch, whatever the number of steps"
    assert [logs["nit"] for logs in seen_logs] == [r.nit for r in train.results]
    assert all("loss" in logs and "nfev" in logs for logs in seen_logs)


def _callback(keras, sink):
    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            sink.append(dict(logs))

    return Record()


def test_non_trainable_weights_untouched(keras):
    X, y = regression(n=40)
    model = small_mlp(keras)
    model.layers[0].trainable = False
    model.compile(loss="mse")
    frozen = [w.copy() for w in model.layers[0].get_weights()]
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=20)
    model.fit(X, y, verbose=0)
    for before, after in zip(frozen, model.layers[0].get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert model.train_function.objective.size == 6  # Dense(5 -> 1) only


def test_closed_form_least_squares(keras, float64):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(80, 5))
    y = X @ rng.normal(size=(5, 1)) + 0.3 + 0.2 * rng.normal(size=(80, 1))
    A = np.hstack([X, np.ones((80, 1))])
    coef = np.linalg.lstsq(A, y, rcond=None)[0].ravel()
    for method in ("L-BFGS-B", "trust-ncg", "trust-exact", "Newton-CG", "BFGS"):
        model = workloads.linear_model(keras, 5)
        model.compile(loss="mse")
        model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=200, gtol=1e-10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # gtol is not Newton-CG's
            model.fit(X, y, verbose=0)
        kernel, bias = model.get_weights()
        np.testing.assert_allclose(np.append(kernel.ravel(), bias), coef, atol=1e-5, err_msg=method)


def test_verbose_prints_progress_and_stop_reason(keras, capsys):
    X, y = workloads.readme_regression()
    model = _readme_model(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=20, verbose=1)
    model.fit(X, y, verbose=0)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert "iter" in out and "|grad|" in out and "stopped:" in out
    nit = model.train_function.result.nit
    iteration_lines = [line for line in lines if line.split()[0].isdigit()]
    assert len(iteration_lines) == nit
    model = _readme_model(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=20, verbose=0)
    model.fit(X, y, verbose=0)
    assert capsys.readouterr().out == ""


def test_bounds_pair_and_per_variable(keras):
    X, y = workloads.readme_regression()
    model = _readme_model(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", bounds=(0.0, 2.5))
    model.fit(X, y, verbose=0)
    w = model.get_weights()[0].ravel()
    assert np.all(w >= 0) and np.all(w <= 2.5 + 1e-12)
    assert w[3] == pytest.approx(2.5) and w[2] == pytest.approx(2.5)
    name = model.train_function.objective.flat.names[0]
    for spec in ({name.split("/")[-1]: (None, 1.5)}, [(None, 1.5)]):
        model = _readme_model(keras)
        model.train_function = scipy_optimizer.make_train_function(model, method="TNC", bounds=spec, maxiter=500)
        model.fit(X, y, verbose=0)
        assert np.max(model.get_weights()[0]) <= 1.5 + 1e-12, spec


def test_nonneg_constraint_becomes_lower_bound(keras):
    X, y = workloads.readme_regression()
    y = X @ np.array([1.0, -2.0, 3.0, -4.0])
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(1, use_bias=False, kernel_constraint=keras.constraints.NonNeg())]
    )
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=100)
    model.fit(X, y, verbose=0)
    assert np.all(model.get_weights()[0] >= 0)
    model.train_function = scipy_optimizer.make_train_function(model, method="CG", maxiter=5)
    with pytest.warns(UserWarning, match="NonNeg"):
        model.fit(X, y, verbose=0)


@pytest.mark.parametrize("method", ["L-BFGS-B", "COBYLA"])
def test_bounds_hold_exactly_for_float32_weights(keras, method):
    """0.3 is not a float32: rounding must not step outside; COBYLA's infeasible trials are never kept."""
    X, y = workloads.readme_regression()
    model = _readme_model(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=300, bounds=(-0.2, 0.3))
    model.fit(X, y, verbose=0)
    w = model.get_weights()[0].astype(np.float64)
    assert np.all(w >= -0.2) and np.all(w <= 0.3), w
    np.testing.assert_allclose(model.train_function.result.fun, full_batch_loss(model, X, y), rtol=1e-6)


def test_fit_keeps_nothing_alive_after_it_returns(keras):
    """A hyperparameter loop must not accumulate: fit's epoch iterator (tf.data threads and buffers)
    is released as soon as fit lets go of it, while the model and its train function live on; the
    model, its train function and objective are released once the user drops them."""
    import gc
    import weakref

    X, y = regression()
    model = small_mlp(keras)
    model.compile(loss="mse")
    train = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=5)
    sources = []

    def spy(*args, train=train):  # what fit hands the train function, held weakly
        sources.append(weakref.ref(args[0]))
        return train(*args)

    model.train_function = spy
    model.fit(X, y, batch_size=16, epochs=2, verbose=0)
    gc.collect()
    assert len(sources) == 2 * 4 and train.objective is not None
    assert all(ref() is None for ref in sources), "an epoch iterator outlived fit: the library still holds it"
    refs = [weakref.ref(o) for o in (model, train, train.objective)]
    del model, train, spy
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True], "model / train function / objective not released"


def test_a_subclass_from_a_module_named_like_keras_trains(keras):
    """A user's model class from a module whose name starts with "keras" (keras_models.py) is still the
    Keras it subclasses: the flavour was once read from the module name's prefix."""
    Subclass = type("Net", (keras.Sequential,), {"__module__": "keras_models"})
    X, y = workloads.readme_regression()
    model = Subclass([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B")
    model.fit(X, y, verbose=0)
    np.testing.assert_allclose(model.get_weights()[0].ravel(), workloads.README_WEIGHTS, atol=1e-3)


def test_the_trace_counts_from_the_runs_start_inside_the_fit_call(keras):
    """result.started (perf_counter at the scipy run's start) lies inside the fit call, and the trace's
    seconds, counted from it, end inside it too: benchmarks place the trace on their own clock with it."""
    import time

    X, y = regression()
    model = small_mlp(keras)
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=20)
    before = time.perf_counter()
    model.fit(X, y, batch_size=len(X), verbose=0)
    after = time.perf_counter()
    result = model.train_function.result
    assert before < result.started < after
    assert result.trace[0, 0] == 0.0 and np.all(np.diff(result.trace[:, 0]) >= 0)
    assert result.started + result.trace[-1, 0] <= after


def _blas_threads() -> set[int]:
    from threadpoolctl import threadpool_info

    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


@pytest.mark.parametrize(
    "method, blas_threads, during",
    [("L-BFGS-B", "auto", 1), ("trust-ncg", "auto", 1), ("BFGS", "auto", 2), ("L-BFGS-B", None, 2),
     ("BFGS", 1, 1)],
)
def test_scipy_blas_threads_during_the_run_only(keras, method, blas_threads, during):
    """scipy's BLAS runs on one thread during a vector-level method's run ("auto"), keeps the process's
    threads for a dense method or with None, follows an explicit limit, and is restored afterwards."""
    from threadpoolctl import threadpool_limits

    if not _blas_threads():
        pytest.skip("no BLAS library that threadpoolctl controls is loaded")
    seen = []

    class Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # each iteration of the run, inside scipy's loop
            seen.append(_blas_threads())

    X, y = regression()
    model = small_mlp(keras)
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=3,
                                                               blas_threads=blas_threads, callbacks=[Look()])
    with threadpool_limits(limits=2, user_api="blas"):  # the process's setting for this test: 2 threads
        model.fit(X, y, batch_size=len(y), verbose=0)
        after = _blas_threads()
    assert seen and all(s == {during} for s in seen), seen
    assert after == {2}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "one"])
def test_blas_threads_refused_before_any_work(keras, bad):
    model = small_mlp(keras)
    model.compile(loss="mse")
    with pytest.raises(ValueError, match="blas_threads must be 'auto', None"):
        scipy_optimizer.make_train_function(model, method="L-BFGS-B", blas_threads=bad)
