"""The conformance suite has power: it passes on the reference and kills every mutant."""

from __future__ import annotations

import pytest
from keras_opt_ref_conformance import report
from keras_opt_ref_conformance.mutants import MUTANTS

pytestmark = pytest.mark.slow


def test_suite_passes_on_the_reference():
    run = report.run_suite("keras_opt_ref.scipy_optimizer")
    failing = {check: t["message"] for check, t in run["tests"].items() if t["outcome"] == "fail"}
    assert not failing and run["exit_code"] == 0, failing
    assert len(run["tests"]) >= 40


@pytest.mark.parametrize("mutant", MUTANTS)
def test_suite_kills_mutant(mutant):
    run = report.run_suite(f"{report.MUTANT_PACKAGE}.{mutant}", ["-x"])
    assert any(t["outcome"] == "fail" for t in run["tests"].values()), f"mutant {mutant} survived the suite"
