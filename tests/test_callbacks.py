"""A scipy run as Keras training: each iteration is an epoch of the train function's callbacks.

Keras's own callbacks (EarlyStopping, ModelCheckpoint, CSVLogger, TensorBoard, TerminateOnNaN)
act during the run; the ground truth is Keras's own: ``model.evaluate`` at the weights the model
held when a callback saw an iteration, the files the callbacks wrote, NumPy's least squares for
the optimum a resumed run must reach. Backend-neutral: tox runs it on Keras 3 (TensorFlow, JAX,
torch) and on tf-keras.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_opt_ref import scipy_optimizer
from keras_opt_ref.bench import workloads

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _fresh(keras):
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def _mlp(keras):
    X, y = workloads.readme_regression()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    model.compile(loss="mse")
    return model, X, y


def _line(keras, X):
    model = workloads.linear_model(keras, X.shape[1], dtype="float64")
    model.compile(loss="mse")
    return model


def _ill_conditioned(n=64, d=12, seed=7):
    """A convex float64 problem L-BFGS-B needs a few dozen iterations for; its unique optimum by lstsq."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * np.logspace(0, 1.5, d)
    y = (X @ rng.normal(size=d) + 0.3 + 0.01 * rng.normal(size=n))[:, None]
    return X, y, np.linalg.lstsq(np.hstack([X, np.ones((n, 1))]), y, rcond=None)[0].ravel()


def _optimum_tolerance(keras):
    """How close a converged run gets to lstsq's optimum: Keras 3 on torch computes parts of a float64
    model's loss in float32 (keras_opt_ref_conformance.truth.working_precision)."""
    from keras_opt_ref_conformance.truth import working_precision

    return 1e-4 if working_precision(keras) == "float64" else 2e-3


def _flat(model):
    return np.concatenate([w.ravel() for w in model.get_weights()]).astype(np.float64)


def _evaluate(model, X, y):
    return float(model.evaluate(X, y, batch_size=len(X), verbose=0))


def _recorder(keras):
    class Recorder(keras.callbacks.Callback):
        """What a callback sees at each epoch end: the epoch, the logs and the model's weights."""

        def __init__(self):
            super().__init__()
            self.rows, self.begins, self.ends = [], 0, 0

        def on_train_begin(self, logs=None):
            self.begins += 1

        def on_train_end(self, logs=None):
            self.ends += 1

        def on_epoch_end(self, epoch, logs=None):
            self.rows.append((epoch, dict(logs), [np.array(w) for w in self.model.get_weights()]))

    return Recorder()


def _stop_at(keras, iteration):
    class StopAt(keras.callbacks.Callback):
        """A user's own stop rule (a budget): stop_training at the end of the given iteration."""

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 >= iteration:
                self.model.stop_training = True

    return StopAt()


@pytest.mark.parametrize("method", ["L-BFGS-B", "trust-ncg"])  # trust-ncg: rejected steps stay at the iterate
def test_each_iteration_is_an_epoch_with_keras_loss_at_the_weights_the_model_holds(keras, method):
    model, X, y = _mlp(keras)
    rec = _recorder(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=40, callbacks=[rec])
    history = model.fit(X, y, verbose=0)
    result = model.train_function.result
    assert [row[0] for row in rec.rows] == list(range(result.nit)) and result.nit > 5
    assert (rec.begins, rec.ends) == (1, 1)
    assert [row[1]["nit"] for row in rec.rows] == list(range(1, result.nit + 1))
    nfev = [row[1]["nfev"] for row in rec.rows]
    assert nfev == sorted(nfev) and nfev[-1] <= result.nfev == history.history["nfev"][0]
    probe = keras.models.clone_model(model)
    for epoch, logs, weights in rec.rows[:: max(1, len(rec.rows) // 12)]:
        probe.set_weights(weights)
        mse = float(np.mean((np.asarray(probe.predict_on_batch(X), dtype=np.float64) - y.reshape(-1, 1)) ** 2))
        assert logs["loss"] == pytest.approx(mse, rel=1e-5, abs=1e-7), epoch  # the loss, "mse", at those weights
        assert logs["grad_norm"] >= 0


def test_early_stopping_ends_a_trust_ncg_run_midway_at_its_best_point(keras):
    model, X, y = _mlp(keras)
    rec = _recorder(keras)
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=2, min_delta=1e-2)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="trust-ncg", maxiter=200, gtol=1e-12, callbacks=[rec, stop])
    history = model.fit(X, y, epochs=3, verbose=0)
    result = model.train_function.result
    assert 3 <= result.nit < 60 and result.nit == len(rec.rows), result.message
    assert result.status == 99 and "EarlyStopping" in result.message and not result.success
    assert len(history.history["loss"]) == 1  # stop_training also ends fit
    assert history.history["nit"] == [result.nit]
    seen = min(row[1]["loss"] for row in rec.rows)
    assert result.fun <= seen
    assert _evaluate(model, X, y) == pytest.approx(result.fun, rel=1e-5)
    # Unstopped, the same run goes much further: the stop was EarlyStopping's.
    keras.utils.set_random_seed(0)
    model, X, y = _mlp(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=200, gtol=1e-12)
    model.fit(X, y, verbose=0)
    assert model.train_function.result.nit > result.nit + 10


def test_a_callbacks_stop_request_ends_the_run_at_that_iteration(keras):
    X, y, _ = _ill_conditioned()
    model = _line(keras, X)
    rec = _recorder(keras)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="CG", maxiter=300, gtol=1e-12, callbacks=[rec, _stop_at(keras, 7)])
    history = model.fit(X, y, verbose=0)
    result = model.train_function.result
    assert result.nit == 7 == len(rec.rows) and "StopAt" in result.message
    assert history.history["nfev"] == [result.nfev] and result.nfev >= rec.rows[-1][1]["nfev"]
    assert _evaluate(model, X, y) == pytest.approx(result.fun, rel=1e-5)


def test_csv_logger_writes_one_row_per_iteration_across_fit_epochs(keras, tmp_path):
    model, X, y = _mlp(keras)
    path = tmp_path / "run.csv"
    rec = _recorder(keras)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="L-BFGS-B", maxiter=8, callbacks=[keras.callbacks.CSVLogger(str(path)), rec])
    model.fit(X, y, epochs=2, verbose=0)
    nits = [r.nit for r in model.train_function.results]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(nits) == len(rec.rows)  # fit's two epochs are one training: nothing overwritten
    assert [int(r["epoch"]) for r in rows] == list(range(sum(nits)))
    assert (rec.begins, rec.ends) == (1, 1)
    for row, (_, logs, _) in zip(rows, rec.rows, strict=True):
        assert float(row["loss"]) == pytest.approx(logs["loss"], rel=1e-12)
        assert int(row["nfev"]) == logs["nfev"]


def test_tensorboard_holds_one_scalar_per_iteration(keras, tmp_path):
    pytest.importorskip("tensorboard")
    tf = pytest.importorskip("tensorflow")
    model, X, y = _mlp(keras)
    board = keras.callbacks.TensorBoard(str(tmp_path / "tb"))
    model.train_function = scipy_optimizer.make_train_function(model, method="BFGS", maxiter=12, callbacks=[board])
    model.fit(X, y, verbose=0)
    result = model.train_function.result
    steps = {}
    for root, _, files in os.walk(tmp_path / "tb"):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    if value.tag == "epoch_loss":
                        steps[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(steps) == list(range(result.nit))
    assert steps[result.nit - 1] >= result.fun


def test_terminate_on_nan_stops_fit_at_the_best_finite_point(keras):
    if hasattr(keras, "ops"):
        matmul, log = keras.ops.matmul, keras.ops.log
    else:  # tf-keras has no keras.ops
        tf = pytest.importorskip("tensorflow")
        matmul, log = tf.matmul, tf.math.log

    class Offset(keras.layers.Layer):
        """y = x w + log(b): L-BFGS-B's first step takes b from 1 to about 0, where the loss is not finite."""

        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 1), initializer="ones", name="w")
            self.b = self.add_weight(shape=(), initializer="ones", name="b")

        def call(self, x):
            return matmul(x, self.w) + log(self.b)

    X = np.random.default_rng(0).normal(size=(32, 2)).astype("float32")
    y = (X.sum(axis=1, keepdims=True) - 30.0).astype("float32")
    model = keras.Sequential([keras.Input((2,)), Offset()])
    model.compile(loss="mse")
    start = _evaluate(model, X, y)
    rec = _recorder(keras)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="L-BFGS-B", maxiter=50, callbacks=[rec, keras.callbacks.TerminateOnNaN()])
    with pytest.warns(RuntimeWarning, match="not finite"):
        history = model.fit(X, y, epochs=3, verbose=0)
    result = model.train_function.result
    assert len(history.history["loss"]) == 1  # TerminateOnNaN saw the non-finite step and ended fit
    assert np.isfinite(result.fun) and result.fun <= start
    assert all(result.fun <= row[1]["loss"] for row in rec.rows)
    assert _evaluate(model, X, y) == pytest.approx(result.fun, rel=1e-5)


def test_fit_verbose_shows_a_live_progress_line(keras, capsys):
    model, X, y = _mlp(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=30)
    model.fit(X, y, verbose=1)
    out = capsys.readouterr().out
    ours = [line for line in out.replace("\r", "\n").splitlines() if "/iteration" in line]
    assert ours, out
    last = ours[-1]
    nit = model.train_function.result.nit
    assert last.split()[0] == f"{nit}/30" and f"nit: {nit} " in last + " "
    assert f"nfev: {model.train_function.result.nfev} " in last + " "  # counts as integers
    model, X, y = _mlp(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=30)
    model.fit(X, y, verbose=0)
    assert "/iteration" not in capsys.readouterr().out


def test_model_checkpoint_writes_during_the_run_and_resume_reaches_the_same_optimum(keras, tmp_path):
    X, y, optimum = _ill_conditioned()
    path = str(tmp_path / "ck.weights.h5")
    model = _line(keras, X)
    saver = keras.callbacks.ModelCheckpoint(path, save_weights_only=True, save_freq=4)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="L-BFGS-B", maxiter=500, gtol=1e-10, ftol=0, callbacks=[saver, _stop_at(keras, 10)])
    model.fit(X, y, verbose=0)
    stopped = model.train_function.result
    assert stopped.nit == 10
    with open(path + ".run.json") as f:
        state = json.load(f)
    assert state["nit"] == state["iteration"] == 8 and state["method"] == "L-BFGS-B"
    saved = _line(keras, X)
    saved.load_weights(path)
    assert _evaluate(saved, X, y) == pytest.approx(state["loss"], rel=1e-5)  # the weights of iteration 8
    assert not np.allclose(_flat(saved), optimum, atol=1e-3)  # mid-way, not at the optimum

    model = _line(keras, X)
    rec = _recorder(keras)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="L-BFGS-B", maxiter=500, gtol=1e-10, ftol=0, callbacks=[rec], resume_from=path)
    np.testing.assert_array_equal(_flat(model), _flat(saved))
    model.fit(X, y, verbose=0)
    result = model.train_function.result
    assert result.resumed_from == {k: state[k] for k in ("nit", "nfev", "njev", "nhev")}
    assert rec.rows[0][0] == 8 and rec.rows[0][1]["nit"] == 9  # the numbering goes on from the checkpoint
    assert result.nit == 8 + len(rec.rows) and result.nfev > state["nfev"]
    tol = _optimum_tolerance(keras)
    np.testing.assert_allclose(_flat(model), optimum, rtol=tol, atol=tol)


def test_resume_refuses_what_it_cannot_resume(keras, tmp_path):
    X, y, _ = _ill_conditioned()
    model = _line(keras, X)
    bare = str(tmp_path / "bare.weights.h5")
    model.save_weights(bare)
    with pytest.raises(ValueError, match="no run state beside it"):
        scipy_optimizer.make_train_function(model, method="L-BFGS-B", resume_from=bare)
    path = str(tmp_path / "ck.weights.h5")
    saver = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="CG", maxiter=3, callbacks=[saver])
    model.fit(X, y, verbose=0)
    with pytest.raises(ValueError, match="written by a 'CG' run"):
        scipy_optimizer.make_train_function(_line(keras, X), method="BFGS", resume_from=path)
    with pytest.raises(ValueError, match="its run had done 3 of maxiter=3 already"):
        scipy_optimizer.make_train_function(_line(keras, X), method="CG", maxiter=3, resume_from=path)
    with pytest.raises(TypeError, match="Keras callbacks"):
        scipy_optimizer.make_train_function(model, method="CG", callbacks=[print])


@pytest.mark.slow
def test_sigkill_from_another_process_loses_at_most_the_iterations_since_the_last_checkpoint(keras, tmp_path):
    """A run is killed (SIGKILL, from this process) once its CSV log shows 15 iterations; a fresh
    process resumes from the last checkpoint (every 4 iterations) and reaches the optimum."""
    every, kill_after = 4, 15
    child = [sys.executable, os.path.join(HERE, "callback_run.py"), str(tmp_path), str(every)]
    run = subprocess.Popen([*child, "first"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "run.csv"
    deadline = time.monotonic() + 300
    rows = 0
    while rows < kill_after and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        rows = len(log.read_text().splitlines()) - 1 if log.exists() else 0
    assert run.poll() is None, f"the run ended before it was killed: {run.communicate()[0][-2000:]}"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    done = len(log.read_text().splitlines()) - 1  # iterations the killed run completed
    with open(tmp_path / "ck.weights.h5.run.json") as f:
        state = json.load(f)
    assert done - every < state["nit"] <= done and state["nit"] % every == 0
    out = subprocess.run([*child, "resume"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["resumed_from"]["nit"] == state["nit"]
    assert report["first_epoch"] == state["nit"]
    tol = _optimum_tolerance(keras)
    np.testing.assert_allclose(report["x"], report["optimum"], rtol=tol, atol=tol)


def test_resume_on_other_data_warns(keras, tmp_path):
    X, y, _ = _ill_conditioned()
    path = str(tmp_path / "ck.weights.h5")
    model = _line(keras, X)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="L-BFGS-B", maxiter=3, callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    model.fit(X, y, verbose=0)
    model = _line(keras, X)
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=5, resume_from=path)
    with pytest.warns(UserWarning, match="the data, the loss or the model differ"):
        model.fit(X, 2 * y, verbose=0)


def test_lm_reports_each_evaluation_as_an_iteration(keras, tmp_path):
    if hasattr(keras, "ops") and keras.backend.backend() != "tensorflow":
        pytest.skip("least squares is computed on TensorFlow only")
    X, y, optimum = _ill_conditioned()
    model = _line(keras, X)
    rec = _recorder(keras)
    model.train_function = scipy_optimizer.make_train_function(model, method="lm", callbacks=[rec])
    model.fit(X, y, verbose=0)
    result = model.train_function.result
    assert len(rec.rows) == result.nit == result.nfev  # MINPACK takes no callback: one per evaluation
    assert [row[1]["nfev"] for row in rec.rows] == list(range(1, result.nfev + 1))
    np.testing.assert_allclose(_flat(model), optimum, rtol=1e-6, atol=1e-8)


def test_checkpoint_on_improvement_of_the_whole_model_resumes(keras, tmp_path):
    """ModelCheckpoint(save_best_only=True) writing the whole model (.keras): its run state is the best
    iterate's, and a run resumes from the .keras file."""
    X, y, optimum = _ill_conditioned()
    path = str(tmp_path / "best.keras")
    model = _line(keras, X)
    rec = _recorder(keras)
    saver = keras.callbacks.ModelCheckpoint(path, monitor="loss", save_best_only=True)
    model.train_function = scipy_optimizer.make_train_function(
        model, method="CG", maxiter=500, gtol=1e-10, callbacks=[rec, saver, _stop_at(keras, 12)])
    model.fit(X, y, verbose=0)
    with open(path + ".run.json") as f:
        state = json.load(f)
    best = min(range(len(rec.rows)), key=lambda i: rec.rows[i][1]["loss"])
    assert state["nit"] == best + 1 and state["loss"] == rec.rows[best][1]["loss"]
    model = _line(keras, X)
    model.train_function = scipy_optimizer.make_train_function(model, method="CG", maxiter=500, gtol=1e-10,
                                                               resume_from=path)
    model.fit(X, y, verbose=0)
    assert model.train_function.result.resumed_from["nit"] == state["nit"]
    tol = _optimum_tolerance(keras)
    np.testing.assert_allclose(_flat(model), optimum, rtol=tol, atol=tol)
