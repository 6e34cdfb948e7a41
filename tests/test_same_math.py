"""The hand-written same-math functions compute the workloads' own loss, gradient and HVP.

Ground truth for the value is ``model.evaluate`` with the weights set to ``x``; for the gradient,
the reference objective and central differences; for the HVP, differences of gradients. The
derivative checks run on float64 models, where differences are accurate to ~1e-8.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import directional_difference, full_batch_loss

from keras_opt_ref import FlatVariables, TensorFlowObjective
from keras_opt_ref.bench import same_math, workloads

# (workload, size, bias) -- small sizes: each case compiles its functions once.
CASES = [("linear", "small", False), ("mlp", "small", False), ("factorization", "tiny", False),
         ("factorization", "tiny", True)]
CONTENDERS = [("tensorflow", {}), ("tensorflow", {"hvp_mode": "forward-over-reverse"}), ("jax", {}), ("torch", {}),
              ("tensorflow", {"form": "keras"})]


def _id(value):
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value if v is not False).replace("True", "bias")
    return "-".join(value.values()) or "default" if isinstance(value, dict) else str(value)


@pytest.fixture(params=CONTENDERS, ids=lambda c: f"{c[0]}-{_id(c[1])}")
def contender(request):
    backend, options = request.param
    reason = same_math.backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    return backend, options


def _point(w, scale=0.1, seed=0):
    x0 = FlatVariables.from_variables(w.model.trainable_variables).read()
    return x0 + scale * np.random.default_rng(seed).normal(size=x0.size)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_value_is_keras_loss_and_gradient_is_the_reference(keras, case, contender):
    name, size, bias = case
    w = workloads.make_workload(name, size, keras=keras, bias=bias)
    fn = same_math.same_math(w, contender[0], **contender[1])
    objective = TensorFlowObjective(w.model, w.x, w.y)
    x = _point(w)
    f, g = fn.value_and_grad(x)
    assert g.dtype == np.float64 and g.shape == (objective.size,)
    objective.set_weights(x)
    truth = full_batch_loss(w.model, w.x, w.y)
    assert f == pytest.approx(truth, rel=1e-5), f"{w.label} on {fn.backend}: {f} != model.evaluate {truth}"
    f_ref, g_ref = objective.value_and_grad(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max(),
                               err_msg=f"{w.label} on {fn.backend}: gradient differs from the reference")
    p = np.random.default_rng(1).normal(size=x.size)
    hp_ref = objective.hessp(x, p)
    np.testing.assert_allclose(fn.hessp(x, p), hp_ref, rtol=1e-3, atol=1e-4 * np.abs(hp_ref).max(),
                               err_msg=f"{w.label} on {fn.backend} ({fn.hvp_mode}): HVP differs from the reference")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_derivatives_match_finite_differences_in_float64(keras, case, contender):
    name, size, bias = case
    w = workloads.make_workload(name, size, keras=keras, bias=bias, dtype="float64")
    fn = same_math.same_math(w, contender[0], **contender[1])
    assert fn.dtype == np.float64
    x = _point(w)
    f, g = fn.value_and_grad(x)
    # The largest components (rows the data use) and a few at random.
    rng = np.random.default_rng(2)
    coords = np.unique(np.concatenate([np.argsort(-np.abs(g))[:4], rng.choice(x.size, 4, replace=False)]))
    h = 1e-6
    for i in coords:
        e = np.zeros_like(x)
        e[i] = h
        fd = (fn.value(x + e) - fn.value(x - e)) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-8), f"{w.label} on {fn.backend}: d/dx[{i}]"
    p = rng.normal(size=x.size)
    hp = fn.hessp(x, p)
    fd = directional_difference(lambda z: fn.value_and_grad(z)[1], x, p)
    np.testing.assert_allclose(hp, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max(),
                               err_msg=f"{w.label} on {fn.backend} ({fn.hvp_mode}): HVP vs differences of gradients")


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_form_is_the_same_function(keras, backend):
    """The factorization as Keras's Dot layer computes it (a batched matrix product) and elementwise: one function."""
    if same_math.backend_skip_reason(backend):
        pytest.skip(same_math.backend_skip_reason(backend))
    w = workloads.make_workload("factorization", "tiny", keras=keras, bias=True, dtype="float64")
    x, p = _point(w), np.random.default_rng(4).normal(size=_point(w).size)
    keras_form, elementwise = (same_math.same_math(w, backend, form=form) for form in ("keras", "elementwise"))
    (f1, g1), (f2, g2) = keras_form.value_and_grad(x), elementwise.value_and_grad(x)
    assert f1 == pytest.approx(f2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(keras_form.hessp(x, p), elementwise.hessp(x, p), rtol=1e-10, atol=1e-14)


def test_unknown_backend_and_workload_are_refused(keras):
    with pytest.raises(ValueError, match="choose one of"):
        same_math.backend_skip_reason("numpy")
    w = workloads.make_workload("mlp", "small", keras=keras)
    with pytest.raises(ValueError, match="choose one of"):
        same_math.same_math(w, "tensorflow", hvp_mode="forward")
    with pytest.raises(ValueError, match="choose one of"):
        same_math.same_math(w, "tensorflow", form="dense")
    other = workloads.Workload("resnet", "small", w.model, w.x, w.y)
    with pytest.raises(ValueError, match="no same-math loss"):
        same_math.same_math(other)
