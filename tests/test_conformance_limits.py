"""The suite bounds each check's time and each implementation's run, and reports a hang with its stack."""

from __future__ import annotations

import pytest
from keras_opt_ref_conformance import plugin, report

# About 40 s of suite subprocesses: in the slow tier (tox -e slow), which keeps the default run under 15 min.
pytestmark = pytest.mark.slow

HANGS = f"{report.MUTANT_PACKAGE}.hangs"
CHECKS = [
    "objective::test_repeatable",
    "objective::test_sample_weights",
    "derivatives::test_gradient_matches_finite_differences[mlp]",
    "methods::test_nonneg_constraint_honoured",
    "fit_contract::test_weights_written_back_when_scipy_stops_early",
]


def test_a_hung_check_fails_with_the_stack_and_the_run_goes_on():
    run = report.run_suite(HANGS, ["--check-timeout", "2"], checks=CHECKS)
    outcomes = [run["tests"][c] for c in CHECKS]
    assert all(o["outcome"] == "fail" for o in outcomes), outcomes
    hung = [o for o in outcomes if o["message"].startswith("CheckTimeout: no result in 2 s")]
    skipped = [o for o in outcomes if o not in hung]
    assert len(hung) == plugin.MAX_HANGS, [o["message"][:200] for o in outcomes]
    for o in hung:  # a check's call, or the probe fit its setup makes (what the implementation offers)
        assert "hangs.py" in o["message"] and "wait_forever" in o["message"], "the stack names where it hung"
    for o in skipped:
        assert "not run: the implementation already hung in 3 checks" in o["message"], o["message"][:300]


def test_a_run_past_its_bound_is_killed_and_the_running_check_reported():
    # 20 s: the suite starts (about 5 s here: TensorFlow's import) and hangs in its first check well before.
    run = report.run_suite(HANGS, ["--check-timeout", "0"], timeout=20, checks=CHECKS[:2])
    assert run["killed"]
    outcome = run["tests"][CHECKS[0]]
    assert outcome["outcome"] == "fail" and "no result: the whole run passed its 20 s bound" in outcome["message"]
