"""Run the suite on implementations and print a check x implementation matrix.

Each implementation runs in its own pytest process (a clean Keras session each), bounded in
time; outcomes come back through the plugin's ``--conformance-json``, which is rewritten
after every check, so a run that had to be killed still reports what it got and which check
was running. Named implementations must pass; mutants (``--mutants``) must each fail at
least one check; the independent implementations (``--independent``) must fail exactly as
their catalogue says (the correct one must pass). Markdown and JSON go to ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .independent import CORRECT, IMPLEMENTATIONS
from .levels import LEVELS
from .mutants import MUTANTS, TENSORFLOW_ONLY
from .verdict import level_lines, level_summary_cell

MUTANT_PACKAGE = "keras_opt_ref_conformance.mutants"
INDEPENDENT_PACKAGE = "keras_opt_ref_conformance.independent"
DEFAULT_RUN_TIMEOUT = 1800.0  # seconds for one implementation's whole run


def run_suite(
    impl: str, extra: list[str] | None = None, timeout: float = DEFAULT_RUN_TIMEOUT, checks: list[str] | None = None
) -> dict:
    """The suite's outcomes for one implementation: {"tests": {check: {outcome, message}}, "exit_code", ...}.

    ``checks`` (ids such as ``"derivatives::test_hvp_matches_finite_differences[trust-ncg]"``) runs only those.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outcomes.json"
        targets = ["--pyargs", "keras_opt_ref_conformance"] if not checks else [node_id(c) for c in checks]
        cmd = [
            sys.executable, "-m", "pytest", *targets, "--impl", impl,
            "-q", "-p", "no:cacheprovider", "--conformance-json", str(out), *(extra or []),
        ]
        env = {**os.environ, "PYTHONWARNINGS": ""}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=timeout)
            code, output, killed = proc.returncode, proc.stdout + proc.stderr, False
        except subprocess.TimeoutExpired as exc:
            code, killed = -9, True
            output = _text(exc.stdout) + _text(exc.stderr)
        if not out.exists():
            tail = output.strip().splitlines()[-15:]
            raise RuntimeError(f"the suite did not run for {impl} (exit {code}):\n" + "\n".join(tail))
        data = json.loads(out.read_text())
        running = data.get("running")
        if running and running not in data["tests"]:
            why = f"the whole run passed its {timeout:g} s bound" if killed else f"the process ended (exit {code})"
            stack = "\n".join(output.strip().splitlines()[-40:])
            data["tests"][running] = {"outcome": "fail", "message": f"no result: {why} during this check.\n{stack}"}
        data["exit_code"] = code
        data["killed"] = killed
        return data


def node_id(check: str) -> str:
    """A check id ``section::test[param]`` as a pytest node id in the installed suite."""
    section, test = check.split("::", 1)
    return f"{Path(__file__).resolve().parent / f'test_{section}.py'}::{test}"


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def short_name(impl: str) -> str:
    return impl.removeprefix(MUTANT_PACKAGE + ".").removeprefix(INDEPENDENT_PACKAGE + ".")


def failures(run: dict) -> dict[str, str]:
    return {check: t["message"] for check, t in run["tests"].items() if t["outcome"] == "fail"}


def levels_of(run: dict) -> dict[str, str]:
    """One word per level for a run: FAIL, LIMIT (not offered), WARN, PASS, or '-' (no check of it ran)."""
    tests = run["tests"]
    return {level: level_summary_cell({k: v for k, v in tests.items() if v.get("level", "core") == level})
            for level in LEVELS}


def level_matrix_markdown(runs: dict[str, dict]) -> str:
    """Implementations x levels: the verdict of each level."""
    lines = ["| implementation | " + " | ".join(LEVELS) + " |", "|---|" + "---|" * len(LEVELS)]
    for impl, run in runs.items():
        cells = levels_of(run)
        lines.append(f"| {short_name(impl)} | " + " | ".join(cells[level] for level in LEVELS) + " |")
    return "\n".join(lines)


def matrix_markdown(runs: dict[str, dict]) -> str:
    impls = list(runs)
    checks = sorted({check for run in runs.values() for check in run["tests"]})
    lines = ["| check | " + " | ".join(short_name(i) for i in impls) + " |", "|---|" + "---|" * len(impls)]
    for check in checks:
        cells = [runs[i]["tests"].get(check, {}).get("outcome", "-") for i in impls]
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    for impl in impls:
        failed = failures(runs[impl])
        if not failed:
            continue
        lines += ["", f"### {short_name(impl)}: failing checks", ""]
        lines += [f"- {line}" for line in level_lines(runs[impl]["tests"])]
        for check, message in sorted(failed.items()):
            body = "\n".join("    " + line for line in message.splitlines())
            lines += ["", f"**{check}**", "", body]
    return "\n".join(lines)


def summary(runs: dict[str, dict], mutants: list[str], independent: list[str]) -> tuple[list[str], bool]:
    lines, ok = [], True
    for impl, run in runs.items():
        outcomes = [t["outcome"] for t in run["tests"].values()]
        failed = outcomes.count("fail")
        kinds = ("pass", "warn", "fail", "limit", "xfail", "xpass", "skip")
        counts = ", ".join(f"{outcomes.count(k)} {k}" for k in kinds if outcomes.count(k))
        correct = impl not in mutants and (impl not in independent or short_name(impl) in CORRECT)
        if correct:
            verdict = "conforms" if failed == 0 and run["exit_code"] == 0 else "DOES NOT CONFORM"
            ok &= failed == 0 and run["exit_code"] == 0
        else:
            verdict = "killed" if failed else "SURVIVED"
            ok &= failed > 0
        lines.append(f"{short_name(impl)}: {verdict} ({counts})")
        lines += [f"  {line}" for line in level_lines(run["tests"])]
    if mutants:
        killed = sum(1 for m in mutants if failures(runs[m]))
        lines.append(f"mutation score: {killed}/{len(mutants)} mutants killed")
    return lines, ok


def main(impls: list[str], with_mutants: bool, out_dir: str, fail_fast: bool = False,
         with_independent: bool = False, timeout: float = DEFAULT_RUN_TIMEOUT, extra: list[str] | None = None) -> int:
    on_tf = _backend() == "tensorflow"
    mutants = [f"{MUTANT_PACKAGE}.{name}" for name in MUTANTS if on_tf or name not in TENSORFLOW_ONLY] \
        if with_mutants else []
    independent = [f"{INDEPENDENT_PACKAGE}.{name}" for name in IMPLEMENTATIONS] if with_independent else []
    runs = {}
    for impl in [*impls, *independent, *mutants]:
        print(f"running the conformance suite on {impl} ...", flush=True)
        args = [*(extra or []), *(["-x"] if fail_fast and impl in mutants else [])]
        runs[impl] = run_suite(impl, args, timeout=timeout)
    table = matrix_markdown(runs)
    lines, ok = summary(runs, mutants, independent)
    flavour = "tf-keras" if os.environ.get("TF_USE_LEGACY_KERAS", "") in ("1", "true") else "Keras 3"
    text = (f"# keras-opt conformance ({flavour})\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n"
            + "## Verdict per level\n\n" + level_matrix_markdown(runs) + "\n\n## Every check\n\n" + table + "\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conformance.md").write_text(text)
    (out / "conformance.json").write_text(json.dumps({"flavour": flavour, "runs": runs}, indent=1))
    print(text)
    print(f"written: {out / 'conformance.md'}, {out / 'conformance.json'}")
    return 0 if ok else 1


def _backend() -> str:
    """The Keras backend the suite's runs will use (tf-keras: TensorFlow)."""
    if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes"):
        return "tensorflow"
    return os.environ.get("KERAS_BACKEND", "tensorflow")
