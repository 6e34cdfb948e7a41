"""Run the suite on implementations and print a check x implementation matrix.

Each implementation runs in its own pytest process (a clean Keras session each); outcomes
come back through the plugin's ``--conformance-json``. Named implementations must pass;
mutants (``--mutants``) must each fail at least one check. Markdown and JSON go to ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .mutants import MUTANTS

MUTANT_PACKAGE = "keras_opt_ref_conformance.mutants"


def run_suite(impl: str, extra: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outcomes.json"
        cmd = [
            sys.executable, "-m", "pytest", "--pyargs", "keras_opt_ref_conformance", "--impl", impl,
            "-q", "-p", "no:cacheprovider", "--conformance-json", str(out), *(extra or []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env={**os.environ, "PYTHONWARNINGS": ""})
        if not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"the suite did not run for {impl} (exit {proc.returncode}):\n" + "\n".join(tail))
        data = json.loads(out.read_text())
        data["exit_code"] = proc.returncode
        return data


def matrix_markdown(runs: dict[str, dict]) -> str:
    impls = list(runs)
    checks = sorted({check for run in runs.values() for check in run["tests"]})
    short = {impl: impl.removeprefix(MUTANT_PACKAGE + ".") for impl in impls}
    lines = ["| check | " + " | ".join(short[i] for i in impls) + " |", "|---|" + "---|" * len(impls)]
    for check in checks:
        cells = [runs[i]["tests"].get(check, {}).get("outcome", "-") for i in impls]
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    failures = [
        f"- {short[i]} :: {check}: {outcome['message']}"
        for i in impls
        for check, outcome in sorted(runs[i]["tests"].items())
        if outcome["outcome"] == "fail"
    ]
    if failures:
        lines += ["", "Failing assertions:", *failures]
    return "\n".join(lines)


def summary(runs: dict[str, dict], mutants: list[str]) -> tuple[list[str], bool]:
    lines, ok = [], True
    for impl, run in runs.items():
        outcomes = [t["outcome"] for t in run["tests"].values()]
        failed = outcomes.count("fail")
        kinds = ("pass", "fail", "xfail", "xpass", "skip")
        counts = ", ".join(f"{outcomes.count(k)} {k}" for k in kinds if outcomes.count(k))
        if impl in mutants:
            verdict = "killed" if failed else "SURVIVED"
            ok &= failed > 0
        else:
            verdict = "conforms" if failed == 0 and run["exit_code"] == 0 else "DOES NOT CONFORM"
            ok &= failed == 0 and run["exit_code"] == 0
        lines.append(f"{impl}: {verdict} ({counts})")
    if mutants:
        killed = sum(1 for m in mutants if any(t["outcome"] == "fail" for t in runs[m]["tests"].values()))
        lines.append(f"mutation score: {killed}/{len(mutants)} mutants killed")
    return lines, ok


def main(impls: list[str], with_mutants: bool, out_dir: str, fail_fast: bool = False) -> int:
    mutants = [f"{MUTANT_PACKAGE}.{name}" for name in MUTANTS] if with_mutants else []
    runs = {}
    for impl in [*impls, *mutants]:
        print(f"running the conformance suite on {impl} ...", flush=True)
        runs[impl] = run_suite(impl, ["-x"] if fail_fast and impl in mutants else None)
    table = matrix_markdown(runs)
    lines, ok = summary(runs, mutants)
    flavour = "tf-keras" if os.environ.get("TF_USE_LEGACY_KERAS", "") in ("1", "true") else "Keras 3"
    text = f"# keras-opt conformance ({flavour})\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + table + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conformance.md").write_text(text)
    (out / "conformance.json").write_text(json.dumps({"flavour": flavour, "runs": runs}, indent=1))
    print(text)
    print(f"written: {out / 'conformance.md'}, {out / 'conformance.json'}")
    return 0 if ok else 1
