"""The benchmark suite as asv sees it: ``asv run`` / ``asv continuous`` first discover the suite by
importing every module of ``benchmarks/`` inside asv's own environments, which hold the project and
asv.conf.json's matrix (TensorFlow, tf-keras, NumPy, SciPy) but no test tools. A module that needs
pytest there fails the whole suite before anything is timed."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What asv's environments lack, made unimportable in the discovering process.
NOT_IN_ASV_ENVIRONMENTS = ("pytest", "_pytest", "pytest_benchmark", "jax", "jaxlib", "jaxopt", "optimistix",
                           "tensorflow_probability", "torch", "matplotlib")
DISCOVER = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # import raises ImportError, as in an environment without the package
sys.argv = [{script!r}, "discover", {root!r}, {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_asv_discovers_the_whole_suite_without_test_tools(tmp_path):
    asv = pytest.importorskip("asv", reason="asv (extra 'bench') runs the discovery")
    script = pathlib.Path(asv.__file__).parent / "benchmark.py"  # what asv runs in its environments
    out = tmp_path / "benchmarks.json"
    code = DISCOVER.format(blocked=NOT_IN_ASV_ENVIRONMENTS, script=str(script), root=str(ROOT / "benchmarks"),
                           out=str(out))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"asv's discovery failed:\n{proc.stderr[-3000:]}"
    names = {b["name"] for b in json.loads(out.read_text())}
    modules = {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert {n.split(".")[0] for n in names} == modules, (sorted(names), modules)
    assert "bench_evaluation.Evaluation.time_loss_and_gradient" in names
