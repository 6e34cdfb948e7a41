"""trust-ncg with the in-graph subproblem (``subproblem="in-graph"``) against scipy's own.

The truth is scipy: its ``CGSteihaugSubproblem`` solved at the same point with the same
radius (each of its branches: converged inside, step leaving the region, negative
curvature), and its trust-ncg run from the same start. float64 models, so that the only
difference left is the order of float64 sums."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ScipySpy, faulty_model, full_batch_loss, regression
from scipy.optimize._trustregion_ncg import CGSteihaugSubproblem

from keras_opt_ref import TensorFlowObjective, scipy_optimizer
from keras_opt_ref.bench import workloads


def _scipy_step(objective, x, radius):
    """scipy's subproblem at ``x``: (p, hits_boundary, products asked for including m(p), branch)."""
    curvatures = []

    def hessp(x_, p):
        hp = objective.hessp(x_, p)
        curvatures.append(p @ hp)
        return hp

    m = CGSteihaugSubproblem(x, objective.value, objective.gradient, hessp=hessp)
    p, hits = m.solve(radius)
    m(p)  # the outer loop's predicted value: one more product
    branch = "negative curvature" if min(curvatures) <= 0 else "boundary" if hits else "inside"
    return p, hits, len(curvatures), branch


def _saddle_model(keras):
    """y = w2 * (w1 * x): at w1, w2 near 0 the Hessian is indefinite (negative curvature along -g)."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False),
                              keras.layers.Dense(1, use_bias=False)])
    model.compile(loss="mse")
    return model


@pytest.mark.slow  # about 11 s: the default run is at its 15-minute budget
@pytest.mark.usefixtures("float64")
def test_step_equals_scipys_subproblem_in_every_branch(keras):
    X, y = regression(n=200, d=3)
    model = workloads.mlp_model(keras, 3)
    model.compile(loss="mse")
    objective = TensorFlowObjective(model, X, y)
    x0 = objective.flat.read()
    rng = np.random.default_rng(0)
    saddle = _saddle_model(keras)
    xs = np.linspace(-1, 1, 50)[:, None]
    saddle_objective = TensorFlowObjective(saddle, xs, 2.0 * xs)
    points = (x0, x0 + 0.3 * rng.normal(size=x0.size))
    cases = [(objective, x, r) for x in points for r in (1e-3, 0.1, 1.0, 100.0)]
    w = workloads.make_workload("factorization", "tiny", keras=keras, dtype="float64", bias=True)  # Embeddings
    embedding_objective = TensorFlowObjective(w.model, w.x, w.y)
    cases += [(embedding_objective, embedding_objective.flat.read(), r) for r in (1e-3, 1.0)]
    cases += [(saddle_objective, np.array([0.01, -0.02]), r) for r in (0.05, 10.0)]
    branches = set()
    for obj, x, radius in cases:
        f, g = obj.value_and_grad(x)
        p, hits, hp, count = obj.steihaug(x, f, g, radius)
        p_ref, hits_ref, count_ref, branch = _scipy_step(obj, x, radius)
        np.testing.assert_allclose(p, p_ref, rtol=1e-9, atol=1e-12, err_msg=f"step at radius {radius}")
        assert hits == hits_ref, (radius, hits, hits_ref)
        assert count == count_ref, f"{count} products in the graph, scipy asks for {count_ref} (radius {radius})"
        np.testing.assert_allclose(hp, obj.hessp(x, p), rtol=1e-9, atol=1e-12, err_msg="H p returned with the step")
        branches.add(branch)
    assert branches == {"negative curvature", "boundary", "inside"}, branches


@pytest.mark.usefixtures("float64")
# One chunk (linearized) in the default run; several chunks in the slow tier (about 11 s, taken out of the
# default run to keep it under 15 minutes).
@pytest.mark.parametrize("chunk_size", [10_000, pytest.param(64, marks=pytest.mark.slow)])
def test_run_follows_scipys_trust_ncg(keras, chunk_size):
    X, y = regression(n=300, d=3)
    runs = {}
    for subproblem in ("scipy", "in-graph"):
        keras.utils.set_random_seed(7)
        model = workloads.mlp_model(keras, 3)
        model.compile(loss="mse")
        train = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=15, subproblem=subproblem,
                                                    chunk_size=chunk_size)
        model.train_function = train
        history = model.fit(X, y, batch_size=32, verbose=0)
        runs[subproblem] = (train.result, history.history, full_batch_loss(model, X, y))
    assert train.objective.traces["steihaug"] == 1, "the subproblem's graph retraced"
    (ref, ref_h, ref_loss), (got, got_h, got_loss) = runs["scipy"], runs["in-graph"]
    assert (got.nit, got.nfev, got.njev, got.nhev) == (ref.nit, ref.nfev, ref.njev, ref.nhev)
    assert got_h["nhev"] == ref_h["nhev"]
    np.testing.assert_allclose(got.x, ref.x, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-9)
    np.testing.assert_allclose(got.fun, got_loss, rtol=1e-12)
    assert got.message == ref.message


def test_nan_inside_the_graph_stops_at_the_best_point(keras, monkeypatch):
    X, y = regression(n=40)
    model, fault = faulty_model(keras, after=6, fault="nan")
    spy = ScipySpy(monkeypatch)
    train = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=100, subproblem="in-graph")
    model.train_function = train
    with pytest.warns(RuntimeWarning, match="Stopped: .*not finite"):
        model.fit(X, y, verbose=0)
    fault.calls.assign(-1e9)  # healthy again: evaluate may judge the point kept
    result = train.result
    assert not result.success
    weights = train.objective.flat.read()
    np.testing.assert_array_equal(weights, result.x)
    best_x, best_f = spy.best()
    np.testing.assert_array_equal(result.x, best_x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(full_batch_loss(model, X, y), result.fun, rtol=1e-5)
    assert result.nfev == spy.calls["fun"]
    assert result.nhev == train.objective.nhvp, "every product done in the graph is counted"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(method="L-BFGS-B", subproblem="in-graph"), r"does not apply to method='L-BFGS-B'"),
        (dict(method="trust-ncg", subproblem="in-graph", hessian="gauss-newton"), r"with hessian='gauss-newton'"),
        (dict(method="trust-ncg", subproblem="graph"), r"Unknown subproblem 'graph'"),
    ],
)
def test_refused_where_it_does_not_apply(keras, options, match):
    model = workloads.mlp_model(keras, 3)
    model.compile(loss="mse")
    with pytest.raises(ValueError, match=match):
        scipy_optimizer.make_train_function(model, **options)
