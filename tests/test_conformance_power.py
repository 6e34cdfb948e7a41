"""The conformance suite has power and no false positives.

- It passes on the reference.
- It kills every mutant, and the checks that catch each one say what is wrong (the words
  listed in the mutant catalogue).
- On the independent implementations (other authors' styles, not built on the reference)
  it names each one's bug, it passes the correct ones at every level they offer (0 false
  positives; correct but wasteful behaviour is WARN, not FAIL), and every level an
  implementation does not offer is LIMIT, not a row of failures.
- On an implementation whose fit always raises, no check passes.
"""

from __future__ import annotations

import pytest
from keras_opt_ref_conformance import report
from keras_opt_ref_conformance.independent import CLEARED, CORRECT, DIAGNOSES, IMPLEMENTATIONS, NOT_OFFERED, WARNED
from keras_opt_ref_conformance.mutants import EVERY_CHECK, MUTANTS, NEEDS_FLOAT64_ARITHMETIC, TENSORFLOW_ONLY
from keras_opt_ref_conformance.truth import working_precision

pytestmark = pytest.mark.slow


def _messages(run: dict) -> str:
    return "\n".join(f"{check}: {t['outcome']}: {t['message'][:400]}" for check, t in sorted(run["tests"].items()))


def _assert_diagnosed(name: str, run: dict, expected: dict[str, str]) -> None:
    for check, words in expected.items():
        if check == EVERY_CHECK:
            # skips and listed xfails are no passes (Keras's own limits, TensorFlow-only checks)
            passing = sorted(c for c, t in run["tests"].items() if t["outcome"] == "pass")
            assert not passing and len(run["tests"]) >= 80, f"{name}: checks that did not fail: {passing}"
            unexplained = sorted(c for c, t in run["tests"].items()
                                 if t["outcome"] == "fail" and words not in t["message"])
            assert not unexplained, f"{name}: failures that do not mention {words!r}: {unexplained}"
            continue
        outcome = run["tests"].get(check)
        assert outcome is not None, f"{name}: check {check} did not run:\n{_messages(run)}"
        assert outcome["outcome"] == "fail", f"{name}: {check} did not catch it ({outcome['outcome']})"
        assert words in outcome["message"], (
            f"{name}: {check} failed without naming the bug (expected {words!r} in):\n{outcome['message']}"
        )


def test_suite_passes_on_the_reference():
    run = report.run_suite("keras_opt_ref.scipy_optimizer")
    failing = report.failures(run)
    assert not failing and run["exit_code"] == 0, failing
    assert len(run["tests"]) >= 100
    levels = report.levels_of(run)
    # every level is offered and passes (least squares is computed by the TensorFlow objective only)
    not_offered = {"least_squares"} if report._backend() != "tensorflow" else set()
    assert {k for k, v in levels.items() if v != "PASS"} == not_offered, levels
    warned = {c: t["message"] for c, t in run["tests"].items() if t["outcome"] == "warn"}
    assert not warned, f"the reference is wasteful or noisy somewhere: {warned}"


@pytest.mark.parametrize("mutant", MUTANTS)
def test_suite_kills_mutant_and_says_why(mutant):
    if mutant in TENSORFLOW_ONLY and report._backend() != "tensorflow":
        pytest.skip(f"{mutant} breaks the TensorFlow objective's internals; it exists on TensorFlow only")
    if mutant in NEEDS_FLOAT64_ARITHMETIC:
        from keras_opt_ref.base.keras_compat import default_keras

        if working_precision(default_keras()) != "float64":
            pytest.skip(f"{mutant} is float32 rounding, which this backend's float64 models carry themselves")
    expected = MUTANTS[mutant]
    checks = None if EVERY_CHECK in expected else list(expected)
    run = report.run_suite(f"{report.MUTANT_PACKAGE}.{mutant}", checks=checks)
    if checks and all(run["tests"].get(c, {}).get("outcome") == "skip" for c in checks):
        # e.g. one_run_per_call on torch: steps_per_execution, the check that catches it, is a Keras limit there
        pytest.skip(f"every check that catches {mutant} is skipped on this backend: {checks}")
    _assert_diagnosed(mutant, run, expected)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_independent_implementation(name):
    if report._backend() != "tensorflow":
        pytest.skip("the independent implementations are written against TensorFlow's train_function(iterator)")
    run = report.run_suite(f"{report.INDEPENDENT_PACKAGE}.{name}")
    assert len(run["tests"]) >= 100
    levels = report.levels_of(run)
    limited = {level for level, verdict in levels.items() if verdict == "LIMIT"}
    assert limited == set(NOT_OFFERED[name]), f"{name}: levels not offered {sorted(limited)}, expected " \
        f"{sorted(NOT_OFFERED[name])}: {levels}"
    if name in CORRECT:
        failing = report.failures(run)
        assert not failing and run["exit_code"] == 0, f"false positives on the correct {name}:\n{failing}"
        for check, words in WARNED.get(name, {}).items():
            outcome = run["tests"][check]
            assert outcome["outcome"] == "warn" and words in outcome["message"], (name, check, outcome)
    else:
        _assert_diagnosed(name, run, DIAGNOSES[name])
        for check in CLEARED.get(name, ()):
            outcome = run["tests"][check]
            assert outcome["outcome"] == "pass", f"{name}: {check} accuses it of something else: {outcome}"
