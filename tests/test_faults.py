"""Fault injection: a loss that turns NaN after k model calls (every method), an exception thrown
inside the compiled call, and SIGINT delivered from another process during L-BFGS-B. After each,
scipy has never been handed a NaN, the model holds the best point scipy evaluated, result.message
gives the reason and the counts are the calls scipy made (``conftest.assert_recovered``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import ScipySpy, assert_recovered, faulty_model, regression

from keras_opt_ref import TensorFlowObjective, scipy_optimizer
from keras_opt_ref.train.methods import LEAST_SQUARES_TABLE, MINIMIZE_TABLE

ALL_METHODS = [m.name for m in MINIMIZE_TABLE] + [m.name for m in LEAST_SQUARES_TABLE]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_loss_turns_nan_after_k_calls(keras, monkeypatch, method):
    X, y = regression(n=40)
    model, fault = faulty_model(keras, after=12, fault="nan")
    spy = ScipySpy(monkeypatch)
    train = scipy_optimizer.make_train_function(model, method=method, maxiter=200)
    model.train_function = train
    with pytest.warns(RuntimeWarning, match="Stopped: the .* is not finite"):
        history = model.fit(X, y, verbose=0)
    fault.calls.assign(-1e9)  # healthy again: evaluate may now judge the point kept
    assert "NaN" in train.result.message or "nan" in train.result.message, train.result.message
    assert np.isfinite(history.history["loss"][-1])
    assert_recovered(train, model, X, y, spy)


def test_exception_inside_the_compiled_call(keras, monkeypatch):
    X, y = regression(n=40)
    model, fault = faulty_model(keras, after=10, fault="error")
    spy = ScipySpy(monkeypatch)
    train = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=200, jit_compile=False)
    model.train_function = train
    with pytest.raises(tf.errors.InvalidArgumentError, match="injected failure"):
        model.fit(X, y, verbose=0)
    fault.calls.assign(-1e9)
    assert train.result.message.startswith("Stopped by InvalidArgumentError"), train.result.message
    assert "injected failure" in train.result.message
    assert_recovered(train, model, X, y, spy)


_KILLER = "import os, signal, sys; sys.stdin.readline(); os.kill(int(sys.argv[1]), signal.SIGINT)"


def test_sigint_from_another_process(keras, monkeypatch):
    """The signal is asked for after 5 evaluations and lands wherever the run is (TensorFlow, scipy,
    this package); from the 9th evaluation on, each one waits for it, so the run cannot end first."""
    # Python's own Ctrl-C handler, as in an interactive session (a background job starts with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_run(keras, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_run(keras, monkeypatch):
    X, y = regression(n=400, d=3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.compile(loss="mse")
    spy = ScipySpy(monkeypatch)
    train = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=10**5, ftol=0.0, gtol=0.0)
    model.train_function = train
    killer = subprocess.Popen([sys.executable, "-c", _KILLER, str(os.getpid())], stdin=subprocess.PIPE)
    real, count = TensorFlowObjective.value_and_grad, {"n": 0}

    def value_and_grad(objective, x):
        count["n"] += 1
        if count["n"] == 5:
            killer.stdin.write(b"now\n")
            killer.stdin.flush()
        deadline = time.monotonic() + 60
        while count["n"] > 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # the signal interrupts this wait at the latest
        return real(objective, x)

    monkeypatch.setattr(TensorFlowObjective, "value_and_grad", value_and_grad)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(X, y, verbose=0)
    finally:
        killer.stdin.close()
        killer.wait(timeout=60)
    assert killer.returncode == 0
    assert train.result.message.startswith("Stopped by KeyboardInterrupt"), train.result.message
    assert train.result.nit > 0
    assert_recovered(train, model, X, y, spy)
