"""The suite's verdict machinery, without Keras: messages keep the reason and the place, precision is ruled out
before state is blamed, colliding points collide exactly, levels and verdicts are what they say."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.optimize
from keras_opt_ref_conformance import expect, levels, probes, verdict
from keras_opt_ref_conformance.spy import Observer


def _raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("did not raise")


def test_a_bare_assert_is_named_by_its_source_line_and_place(tmp_path):
    source = tmp_path / "tutorial_wrapper.py"  # imported plainly: pytest does not rewrite its asserts
    source.write_text("def set_flat(shape):\n    assert len(shape) <= 2\n")
    spec = importlib.util.spec_from_file_location("tutorial_wrapper", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = expect.describe_exception(_raised(lambda: module.set_flat((3, 3, 2))))
    where = f"{source}:2 in set_flat: `assert len(shape) <= 2`"
    assert text == f"AssertionError: a bare assert failed: `assert len(shape) <= 2` (raised at {where})"


def test_a_long_tensorflow_style_message_keeps_its_reason():
    frame = '  File "/site-packages/tensorflow/x{0}.py", line {0}, in f{0}\n    y = op(x)'
    stack = "\n".join(frame.format(i) for i in range(60))
    values = " ".join(f"{v:.4f}" for v in np.linspace(0, 1, 400))
    message = (f"Graph execution error:\n\nDetected at node sub defined at (most recent call last):\n{stack}\n"
               f"Incompatible shapes: [80] vs. [40,2] with values [{values}]\n"
               "\t [[{{node sub}}]] [Op:__inference_f]")
    text = expect.reason(ValueError(message))
    assert text.startswith("Graph execution error:") and "Incompatible shapes: [80] vs. [40,2]" in text
    assert "File" not in text and "<numbers>" in text and len(text) <= 700


def test_an_autograph_error_keeps_its_indented_reason():
    message = ("in user code:\n\n    File \"/x/float32_style.py\", line 80, in value_and_gradient  *\n"
               "        y = tf.concat(tf.nest.flatten(targets), axis=0)\n\n"
               "    ValueError: Dimension 0 in both shapes must be equal, but are 1 and 3.")
    assert expect.reason(ValueError(message)) == ("in user code: ValueError: Dimension 0 in both shapes must be equal, "
                                                  "but are 1 and 3.")


def test_the_place_is_the_implementations_frame_not_scipys():
    def fun(x):
        raise RuntimeError("boom in the objective")

    exc = _raised(lambda: scipy.optimize.minimize(fun, np.zeros(2), method="L-BFGS-B"))
    assert "in fun: `raise RuntimeError(\"boom in the objective\")`" in expect.location(exc)


def test_float32_is_named_before_any_other_cause():
    truth = 0.123456789012345
    with pytest.raises(AssertionError, match="computed in float32") as info:
        expect.close_scalar(float(np.float32(truth)), truth, rtol=1e-9, what="f", truth="evaluate", why="a stale memo")
    assert "What it looks for otherwise: a stale memo" in str(info.value)
    with pytest.raises(AssertionError, match="relative difference") as info:  # far off: the check's own cause
        expect.close_scalar(truth * 1.01, truth, rtol=1e-9, what="f", truth="evaluate", why="a stale memo")
    assert "float32" not in str(info.value)
    expect.close_scalar(truth * (1 + 1e-13), truth, rtol=1e-9, what="f", truth="evaluate", why="-")


def test_colliding_points_share_every_cheap_key_exactly():
    x = np.random.default_rng(0).normal(size=21)
    pairs = {label: (a, b) for label, a, b in probes.collisions(x)}
    assert len(pairs) == 5 and all(not np.array_equal(a, b) for a, b in pairs.values())
    a, b = pairs["a permutation of its entries (same sum, same norm, same sorted values)"]
    assert float(np.sum(a)) == float(np.sum(b)) and sorted(a) == sorted(b)
    a, b = pairs["the same sum (+0.125 on one entry, -0.125 on another)"]
    assert float(np.sum(a)) == float(np.sum(b))
    a, b = pairs["the same norm (one entry's sign flipped)"]
    assert np.linalg.norm(a) == np.linalg.norm(b)
    a, b = pairs["a change of 2e-6 relative that np.allclose calls equal"]
    assert np.allclose(a, b)


def test_which_point_names_the_weights():
    start, result, last = np.zeros(3), np.ones(3), np.full(3, 2.0)
    named = {"result.x": result, "the last point evaluated": last, "the start weights": start}
    assert probes.which_points(np.float32(last).astype(np.float64), named) == ["the last point evaluated"]
    assert probes.distinct(named) and not probes.distinct({**named, "again": result})


def test_levels_parse():
    assert levels.parse(None) is None and levels.parse("auto") is None
    assert levels.parse("curvature") == ("core", "curvature")
    assert levels.parse("all") == levels.LEVELS
    with pytest.raises(ValueError, match="unknown level"):
        levels.parse("core,hessians")
    assert levels.method_level("trust-ncg") == "curvature" and levels.method_level("trf") == "least_squares"
    assert levels.method_level("Nelder-Mead") == "methods" and levels.method_level("L-BFGS-B") == "core"


def test_one_verdict_per_level():
    outcomes = {
        "a::x": {"outcome": "pass", "message": "", "level": "core"},
        "a::y": {"outcome": "warn", "message": "wasteful", "level": "core"},
        "b::z": {"outcome": "limit", "message": "method='trf' refused", "level": "least_squares"},
        "c::w": {"outcome": "fail", "message": "wrong", "level": "curvature"},
        "c::v": {"outcome": "pass", "message": "", "level": "curvature"},
    }
    lines = dict(line.split(": ", 1) for line in verdict.level_lines(outcomes))
    assert lines["core"] == "PASS (2 checks, 1 WARN)"
    assert lines["least_squares"] == "LIMIT (not offered: method='trf' refused)"
    assert lines["curvature"].startswith("FAIL (1 of 2: c::w")
    cells = {lv: verdict.level_summary_cell({k: v for k, v in outcomes.items() if v["level"] == lv})
             for lv in ("core", "least_squares", "curvature", "bounds")}
    assert cells == {"core": "WARN", "least_squares": "LIMIT", "curvature": "FAIL", "bounds": "-"}


def test_scipys_own_refusal_at_its_entry_is_a_warning_not_work_done():
    """An unknown method passed through to scipy, which refuses it before any evaluation: WARN, not FAIL."""
    with Observer(__name__) as observe:
        def attempt():
            scipy.optimize.minimize(lambda x: float(x @ x), np.ones(2), method="no-such-method")

        text = expect.expect_refusal(attempt, problem="method='no-such-method'", keywords=("no-such-method",),
                                     observe=observe)
    assert "no-such-method" in text and len(observe.warnings) == 1 and "refused it at its entry" in observe.warnings[0]


def test_float32_numbers_are_named_whatever_the_dtype():
    """A derivative handed over in float32 (or cast through it) hides inside finite-difference tolerances; the PINN
    checks name it from its entries: a float64 computation gives exact float32 numbers with probability ~2**-29."""
    g = np.random.default_rng(0).normal(size=25) * 100
    assert not probes.float32_numbers(g)
    assert probes.float32_numbers(g.astype(np.float32)) and probes.float32_numbers(g.astype(np.float32).astype(float))
    assert not probes.float32_numbers(np.array([0.5, 0.25, 0.0, 1.0]))  # too few entries to tell

    class Steps:
        precision = "float64"

    with pytest.raises(AssertionError, match=r"exactly a float32 number \(dtype float64\): it is computed in float32"):
        probes.require_float64_vector(g.astype(np.float32).astype(float), Steps(), "the gradient", "-")
    probes.require_float64_vector(g, Steps(), "the gradient", "-")
    Steps.precision = "float32"  # where Keras computes float64 models partly in float32, that is no bug
    probes.require_float64_vector(g.astype(np.float32), Steps(), "the gradient", "-")
