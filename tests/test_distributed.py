"""Full-batch objectives under tf.distribute.MirroredStrategy on two logical CPU devices.

Ground truth is the same model built without a strategy (single device), at the same weights:
its Keras loss over all samples in one batch (``model.evaluate``) and the single-device objective's
derivatives, which the rest of the tests check against finite differences. Models are float64, so
"equal" means float64 rounding (the replicas sum the rows in another order). The two devices come
from tests/conftest.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import KERAS, full_batch_loss

from keras_opt_ref import backends, scipy_optimizer
from keras_opt_ref.backends.tensorflow.distributed import DistributedObjective
from keras_opt_ref.bench.workloads import factorization_data, factorization_model

pytestmark = pytest.mark.skipif(KERAS.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow's")

RNG = np.random.default_rng(11)
X = RNG.normal(size=(103, 4))  # 103 rows: shards of 52 and 51, chunks that do not divide them
W_TRUE = np.array([1.0, 2.0, 3.0, 4.0])
Y = (X @ W_TRUE)[:, None]
SW = RNG.uniform(0.2, 2.0, size=103)


@pytest.fixture
def strategy():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("TensorFlow's devices were initialized before tests/conftest.py could split the CPU in two")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def mlp(keras, loss="mse", l2=0.01):
    reg = keras.regularizers.L2(l2) if l2 else None
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh", kernel_regularizer=reg),
                              keras.layers.Dense(1)])
    model.compile(loss=loss)
    return model


def twins(build, strategy):
    """The same model (same weights) built under the strategy and without one."""
    with strategy.scope():
        distributed = build()
    single = build()
    single.set_weights(distributed.get_weights())
    return distributed, single


def assert_same_objective(distributed, single, x, p):
    assert isinstance(distributed, DistributedObjective) and not isinstance(single, DistributedObjective)
    np.testing.assert_allclose(distributed.value(x), single.value(x), rtol=1e-12)
    np.testing.assert_allclose(distributed.value_and_grad(x)[1], single.value_and_grad(x)[1], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(distributed.hessp(x, p), single.hessp(x, p), rtol=1e-10, atol=1e-13)


def test_the_issue_snippet_trains_and_finds_the_true_weights(keras, strategy):
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
        model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg")
    model.fit(X.astype("float32"), Y.astype("float32"), batch_size=16, verbose=0)
    assert isinstance(model.train_function.objective, DistributedObjective)
    np.testing.assert_allclose(model.get_weights()[0].ravel(), W_TRUE, atol=1e-4)


# Several chunks per replica for every reduction; one chunk per replica for one of them here, for the others in
# the slow tier (about 9 s each, taken out of the default run to keep it under 15 minutes).
@pytest.mark.parametrize(("chunk_size", "reduction"), [
    (7, "sum_over_batch_size"), (7, "sum"), (7, "mean_with_sample_weight"), (1000, "mean_with_sample_weight"),
    pytest.param(1000, "sum_over_batch_size", marks=pytest.mark.slow),
    pytest.param(1000, "sum", marks=pytest.mark.slow),
])
def test_value_gradient_hvp_and_hessian_equal_one_device(keras, strategy, float64, reduction, chunk_size):
    if reduction == "mean_with_sample_weight" and not hasattr(keras, "ops"):
        pytest.skip("tf-keras has no mean_with_sample_weight reduction")
    distributed, single = twins(lambda: mlp(keras, loss=keras.losses.MeanSquaredError(reduction=reduction)), strategy)
    d = backends.make_objective(distributed, X, Y, SW, chunk_size=chunk_size)
    s = backends.make_objective(single, X, Y, SW, chunk_size=chunk_size)
    x = d.flat.read() + 0.1 * RNG.normal(size=d.size)
    assert_same_objective(d, s, x, RNG.normal(size=d.size))
    np.testing.assert_allclose(d.hessian(x), s.hessian(x), rtol=1e-10, atol=1e-13)
    s.flat.write(x)
    np.testing.assert_allclose(d.value(x), full_batch_loss(single, X, Y, SW), rtol=1e-12)


def test_embeddings_factorization_reaches_the_one_device_loss(keras, strategy, float64):
    data = factorization_data(30, 20, 240, seed=2)
    def build():
        model = factorization_model(keras, 30, 20, width=3, dtype="float64")
        model.compile(loss="mse")  # under the scope too: Keras's compile belongs to the model's strategy
        return model

    distributed, single = twins(build, strategy)
    objectives, starts = [], []
    for model in (distributed, single):
        objectives.append(backends.make_objective(model, data.x, data.ratings, chunk_size=50))
        starts.append(full_batch_loss(model, data.x, data.ratings) if model is single else None)
    x = objectives[0].flat.read()
    assert_same_objective(*objectives, x, RNG.normal(size=x.size))  # embedding gradients included
    for model in (distributed, single):
        model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=60)
        model.fit(data.x, data.ratings, batch_size=64, verbose=0)
    found = [m.train_function.result.fun for m in (distributed, single)]
    assert found[1] < 0.5 * starts[1]  # the runs got somewhere
    np.testing.assert_allclose(found[0], found[1], rtol=1e-7)
    np.testing.assert_allclose(found[0], full_batch_loss(single, data.x, data.ratings), rtol=1e-7)


def test_in_graph_trust_ncg_takes_the_one_device_steps(keras, strategy, float64):
    distributed, single = twins(lambda: mlp(keras), strategy)
    for model in (distributed, single):
        model.train_function = scipy_optimizer.make_train_function(
            model, method="trust-ncg", subproblem="in-graph", maxiter=15)
        model.fit(X, Y, batch_size=16, verbose=0)
    runs = [m.train_function.result for m in (distributed, single)]
    assert runs[0].nit == runs[1].nit and runs[0].nhev == runs[1].nhev
    np.testing.assert_allclose(runs[0].x, runs[1].x, rtol=1e-8, atol=1e-10)
    assert runs[1].fun < 0.1 * full_batch_loss(mlp(keras), X, Y)  # an untrained twin's loss


def test_least_squares_is_refused_with_the_alternative(keras, strategy):
    with strategy.scope():
        model = mlp(keras)
    with pytest.raises(ValueError, match=r"tf.distribute strategy.*trust-ncg"):
        scipy_optimizer.make_train_function(model, method="trf")


def test_a_loss_that_cannot_be_split_is_refused(keras, strategy):
    class Penalty(keras.layers.Layer):
        def call(self, inputs):
            self.add_loss(0.1 * tf.reduce_mean(tf.square(inputs)))  # one value per batch: no chunk rule
            return inputs

    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1), Penalty()])
        model.compile(loss="mse")
    with pytest.raises(ValueError, match="cannot be split across the 2 replicas"):
        backends.make_objective(model, X, Y)


def test_fewer_rows_than_replicas_is_refused(keras, strategy):
    with strategy.scope():
        model = mlp(keras)
    with pytest.raises(ValueError, match="at least one row"):
        backends.make_objective(model, X[:1], Y[:1])


# ------------------------------------------------------------------ two localhost workers
def _workers(job, flavour_mode, **params):
    from keras_opt_ref.bench import cluster

    return cluster.launch(job, 1, **params, mode=flavour_mode), cluster.launch(job, 2, **params, mode=flavour_mode)


def _mode(keras):
    # Keras 3.15.1's own fit fails under MultiWorkerMirroredStrategy before any train function runs
    # (its _maybe_symbolic_build reduces a PerReplica batch in eager mode): there each worker calls
    # the train function's run() on its own shard. tf-keras's fit works, and shards the batches itself.
    return "run" if hasattr(keras, "ops") else "fit"


@pytest.mark.slow
def test_two_localhost_workers_agree_and_match_one_worker(keras):
    (one,), two = _workers("regression", _mode(keras), timeout=600, verbose=1)
    assert "scipy trust-ncg" in two[0]["log"] and "scipy trust-ncg" not in two[1]["log"]  # only the chief prints
    assert [w["objective"] for w in two] == ["DistributedObjective"] * 2 and [w["chief"] for w in two] == [True, False]
    assert two[0]["x"] == two[1]["x"] and two[0]["fun"] == two[1]["fun"]  # the same scipy loop, bit for bit
    assert two[0]["rows"] == one["rows"] == 10  # the shards add up to the training set, once
    np.testing.assert_allclose(two[0]["probe"], one["probe"], rtol=1e-12, atol=1e-14)  # f, g at a fixed point
    np.testing.assert_allclose(two[0]["x"][:4], W_TRUE, atol=1e-5)
    np.testing.assert_allclose(one["x"][:4], W_TRUE, atol=1e-5)


@pytest.mark.slow
def test_two_localhost_workers_factorization_reaches_the_one_worker_loss(keras):
    (one,), two = _workers("factorization", _mode(keras), timeout=900, shape=[60, 40, 900], width=4, maxiter=40,
                           batch_size=128)
    assert two[0]["x"] == two[1]["x"]
    np.testing.assert_allclose(two[0]["probe"], one["probe"], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(two[0]["fun"], one["fun"], rtol=1e-6)


@pytest.mark.slow
def test_a_failed_worker_ends_the_run_with_a_clear_error_and_the_best_point(keras):
    from keras_opt_ref.bench import cluster

    chief, dead = cluster.launch("factorization", 2, timeout=600, allow_failures=True, mode=_mode(keras),
                                 shape=[60, 40, 900], width=4, maxiter=40, batch_size=128, fail_after=5)
    assert dead["exit_code"] == 3  # worker 1 died at its 6th evaluation
    assert chief["error"] == "WorkerFailedError" and chief["chief"]
    assert "failed or stopped answering" in chief["message"] and "restart every worker" in chief["message"]
    assert chief["left_at_best"] and chief["moved_from_start"] and np.isfinite(chief["best_value"])


@pytest.mark.slow
def test_only_the_chief_writes_the_callbacks_files_and_every_worker_stops_alike(keras, tmp_path):
    """Both workers are given a CSVLogger, a ModelCheckpoint and a stop rule, as one script gives them to
    every machine: only worker 0 writes, and both stop at the same iteration on the same point."""
    from keras_opt_ref.bench import cluster

    two = cluster.launch("regression", 2, mode=_mode(keras), callbacks_dir=str(tmp_path), stop_at=2, maxiter=50)
    assert sorted(os.listdir(tmp_path)) == ["worker0.csv", "worker0.weights.h5", "worker0.weights.h5.run.json"]
    assert [w["nit"] for w in two] == [2, 2] and two[0]["x"] == two[1]["x"]
    with open(tmp_path / "worker0.csv") as f:
        assert len(f.read().splitlines()) == 1 + 2  # the header and one row per iteration


def test_a_declared_loss_over_rows_is_refused_under_a_strategy_before_any_work(keras, strategy):
    """An overridden compute_loss may not divide by the replicas as Keras's does, so the replica shares of a
    declared rule are not known to add up: refused, naming the setting and the way out."""
    with strategy.scope():
        model = mlp(keras)
    with pytest.raises(ValueError, match="loss_over_rows is not supported under a tf.distribute strategy yet"):
        backends.make_objective(model, X, Y, loss_over_rows="mean")
