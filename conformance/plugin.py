"""pytest plugin: choose the implementation, show it, bound each check's time, apply an adopter's
xfails, record every outcome with its whole message, and summarize the failures by section."""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import importlib.metadata
import json
import os
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

import pytest

from . import levels, verdict
from .spy import Observer

REFERENCE = "keras_opt_ref.scipy_optimizer"
SECTIONS = ("objective", "derivatives", "methods", "fit_contract", "bad_input")
DEFAULT_CHECK_TIMEOUT = 300.0  # seconds; a check normally takes 1-10 s
MESSAGE_LIMIT = 6000
_SUITE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("keras-opt conformance")
    group.addoption("--impl", default=None, help="module exposing make_train_function (or env KERAS_OPT_IMPL)")
    group.addoption("--xfails-file", default=None, help="file of test ids expected to fail, one per line")
    group.addoption("--conformance-json", default=None, help="write each check's outcome and message here")
    group.addoption("--levels", default=None,
                    help="levels to check, comma-separated (core is always in): "
                    f"{', '.join(levels.LEVELS)}; 'all'; default 'auto': each optional level and method is "
                    "checked unless the implementation refuses it on purpose when first asked (then LIMIT)")
    group.addoption("--check-timeout", type=float, default=None,
                    help=f"seconds per check before it fails as hung (default {DEFAULT_CHECK_TIMEOUT:g}, "
                    "or env KERAS_OPT_CHECK_TIMEOUT); 0 turns the limit off")


def pytest_configure(config):
    config.addinivalue_line("markers", "level(name, method=None): the conformance level a check belongs to "
                            "(default core) and the method it needs besides its `method` parameter")


def implementation_name(config) -> str | None:
    name = config.getoption("--impl") or os.environ.get("KERAS_OPT_IMPL")
    if name:
        return name
    # The reference is the default only inside this repository.
    if (Path(str(config.rootpath)) / "keras_opt_ref" / "scipy_optimizer.py").exists():
        return REFERENCE
    return None


def check_timeout(config) -> float:
    value = config.getoption("--check-timeout")
    if value is None:
        value = float(os.environ.get("KERAS_OPT_CHECK_TIMEOUT", DEFAULT_CHECK_TIMEOUT))
    return float(value)


def _describe(name: str) -> str:
    module = importlib.import_module(name)
    top = name.split(".")[0]
    version = getattr(module, "__version__", None) or getattr(importlib.import_module(top), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(top.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return f"{name} {version}"


def pytest_report_header(config):
    if not _is_conformance_run(config):
        return None
    keras = _keras_module()
    name = implementation_name(config)
    try:
        impl = _describe(name) if name else "NONE (name one with --impl MODULE or KERAS_OPT_IMPL)"
    except Exception as exc:  # the session fixture reports it properly; the header must not crash
        impl = f"{name} (cannot be imported: {type(exc).__name__}: {exc})"
    timeout = check_timeout(config)
    backend = keras.backend.backend() if hasattr(keras.backend, "backend") else "tensorflow"
    return (
        f"keras-opt conformance: implementation {impl}; {keras.__name__} {keras.__version__} on the {backend} "
        f"backend; tensorflow {_version_of('tensorflow')}; check timeout {f'{timeout:g} s' if timeout else 'off'}"
    )


def _version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _is_conformance_run(config) -> bool:
    named = config.getoption("--impl") or os.environ.get("KERAS_OPT_IMPL")
    prefixes = (str(_SUITE), "conformance", "keras_opt_ref_conformance")
    return bool(named) or any(str(arg).startswith(prefixes) for arg in config.args)


def _keras_module():
    legacy = os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes")
    return importlib.import_module("tf_keras" if legacy else "keras")


@pytest.fixture(scope="session")
def impl(pytestconfig):
    name = implementation_name(pytestconfig)
    if not name:
        pytest.exit("No implementation named: pass --impl MODULE or set KERAS_OPT_IMPL.", returncode=4)
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        pytest.exit(f"cannot import {name}: {type(exc).__name__}: {exc}", returncode=4)
    if not callable(getattr(module, "make_train_function", None)):
        pytest.exit(f"{name} has no make_train_function(model, **kwargs).", returncode=4)
    return module


@pytest.fixture
def observe(impl):
    with Observer(impl.__name__) as observer:
        yield observer


@pytest.fixture
def keras():
    return _keras_module()


@pytest.fixture(scope="session")
def offers(impl, pytestconfig):
    """What the implementation offers (``levels.Offers``), asked once per level or method."""
    try:
        selected = levels.parse(pytestconfig.getoption("--levels"))
    except ValueError as exc:
        pytest.exit(str(exc), returncode=4)
    return levels.Offers(impl, _keras_module(), Observer, selected)


def level_of(item) -> str:
    marker = item.get_closest_marker("level")
    if marker is not None:
        return marker.args[0]
    method = _method_of(item)
    return levels.method_level(method) if method else "core"


def _method_of(item) -> str | None:
    """The method a check needs: its ``method`` parameter, or the ``method=`` of its level marker."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "method" in callspec.params:
        return callspec.params["method"]
    marker = item.get_closest_marker("level")
    return marker.kwargs.get("method") if marker is not None else None


@pytest.fixture
def offered(request) -> None:
    """A check whose level or method the implementation does not offer ends LIMIT, before it runs (requested
    by the suite's per-check fixture inside any strategy scope and before the check's random seed is set;
    a fixture, so that the suite's conftest uses this module's state whatever name it was imported under).
    After a probe fit (``offers.probed``) the caller clears Keras's session: Keras caches global state on
    first use (the dtype policy from floatx) that the check must not inherit."""
    item = request.node
    offers = request.getfixturevalue("offers")
    offers.probed = False
    if _hung_too_often():
        return  # the check fails at once in its call; no more probe fits
    with _time_limit(item, "probe of what the implementation offers"):
        offer = offers.of(level_of(item), _method_of(item))
    if not offer.offered:
        verdict.limit(offer.why)


def _in_suite(item) -> bool:
    return Path(str(item.fspath)).resolve().parent == _SUITE


def check_id(item) -> str:
    return f"{Path(str(item.fspath)).stem.removeprefix('test_')}::{item.name}"


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--xfails-file")
    if not path:
        return
    entries = [
        line.split("#", 1)[0].strip()
        for line in Path(path).read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]
    used = set()
    for item in items:
        if not _in_suite(item):
            continue
        for entry in entries:
            if item.nodeid.endswith(entry) or item.nodeid.split("::", 1)[-1] == entry or entry in (item.name,
                                                                                                   check_id(item)):
                item.add_marker(pytest.mark.xfail(reason=f"listed in {path}", strict=False))
                used.add(entry)
    for entry in entries:
        if entry not in used:
            warnings.warn(f"xfails file {path}: entry {entry!r} matches no test", UserWarning, stacklevel=1)


# ---------------------------------------------------------------------------- time limits
class CheckTimeout(BaseException):
    """Raised in the main thread when a check passes its time limit (a BaseException, so that an
    implementation's ``except Exception`` does not swallow it)."""


_HUNG: list[str] = []  # checks that timed out so far
MAX_HANGS = 3  # after this many, the remaining checks fail at once instead of each waiting out the limit


def _stacks(frame) -> str:
    """The main thread's stack where it hung (innermost frames first, so that a cut message keeps
    them), then every thread's (faulthandler)."""
    text = "".join(reversed(traceback.format_stack(frame)[-25:]))
    with tempfile.TemporaryFile(mode="w+") as out:
        faulthandler.dump_traceback(out, all_threads=True)
        out.seek(0)
        threads = out.read()
    return f"main thread, most recent call first:\n{text}\nall threads (faulthandler):\n{threads}"


@contextlib.contextmanager
def _time_limit(item, what: str = "check"):
    """The check's time limit around a block (its call, or the probe fit its setup makes); a block that
    passes it raises CheckTimeout with the implementation's stack, and the check is counted as hung."""
    limit = check_timeout(item.config)
    usable = limit > 0 and _in_suite(item) and hasattr(signal, "setitimer")
    usable = usable and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        # Re-armed every 5 s in case the implementation swallows the first one.
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        raise CheckTimeout(
            f"no result in {limit:g} s (--check-timeout) during the {what}: the implementation hung or is far too "
            f"slow. Its stack at that moment:\n{_stacks(frame)}"
        )

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    # Last resort if the main thread is stuck in C code and never sees the signal: dump every
    # thread's stack to stderr and end the process (keras-opt-ref conformance reports the check).
    faulthandler.dump_traceback_later(limit + 120, exit=True, file=sys.stderr)
    try:
        yield
    except CheckTimeout:
        _HUNG.append(check_id(item))
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def _hung_too_often() -> bool:
    return len(_HUNG) >= MAX_HANGS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _in_suite(item) and check_timeout(item.config) > 0 and _hung_too_often():
        pytest.fail(f"not run: the implementation already hung in {len(_HUNG)} checks ({', '.join(_HUNG)})",
                    pytrace=False)
    with _time_limit(item):
        outcome = yield
    excinfo = getattr(outcome, "excinfo", None)
    if excinfo is not None and excinfo[0] is CheckTimeout and check_id(item) not in _HUNG:
        _HUNG.append(check_id(item))


# ---------------------------------------------------------------------------- outcomes
_OUTCOMES: dict[str, dict[str, str]] = {}


def _json_path(config) -> str | None:
    return config.getoption("--conformance-json")


def _write_outcomes(config, running: str | None = None) -> None:
    path = _json_path(config)
    if path:
        data = {"implementation": implementation_name(config), "tests": _OUTCOMES, "running": running}
        Path(path).write_text(json.dumps(data, indent=1))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if _in_suite(item):
        _write_outcomes(item.config, running=check_id(item))  # a killed run still says which check hung


def failure_message(excinfo) -> str:
    """The whole message of a failure: type and text, every line (expected, actual, explanation)."""
    exc = excinfo.value
    text = str(exc).strip()
    if isinstance(exc, AssertionError) and not text:
        text = excinfo.exconly()
    elif isinstance(exc, AssertionError) and "\nassert " in text:
        text = text.split("\nassert ", 1)[0].strip()  # pytest's rewritten-assert dump adds nothing to the message
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _in_suite(item):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        observer = getattr(item, "funcargs", {}).get("observe")
        warnings_ = list(getattr(observer, "warnings", [])) if report.when == "call" else []
        message = ""
        if hasattr(report, "wasxfail"):
            state = "xpass" if report.passed else "xfail"
        else:
            state = {"passed": "pass", "failed": "fail", "skipped": "skip"}[report.outcome]
        if report.failed and call.excinfo is not None:
            message = failure_message(call.excinfo)
        elif state == "skip":
            message = verdict.skip_reason(report)
            if message.startswith(verdict.LIMIT_PREFIX):
                state, message = "limit", message.removeprefix(verdict.LIMIT_PREFIX)
        elif state == "pass" and warnings_:
            state, message = "warn", "\n".join(warnings_)
        _OUTCOMES[check_id(item)] = {"outcome": state, "message": message, "level": level_of(item)}
        _write_outcomes(item.config)


def section_summary(outcomes: dict[str, dict[str, str]]) -> list[str]:
    """One line per contract section: checks passed, and the failing ones by name."""
    lines = []
    for section in SECTIONS:
        mine = {k: v for k, v in outcomes.items() if k.split("::")[0] == section}
        if not mine:
            continue
        failed = [k.split("::", 1)[1] for k, v in mine.items() if v["outcome"] == "fail"]
        counts = ", ".join(f"{n} {s}" for s in verdict.STATES
                           if (n := sum(v["outcome"] == s for v in mine.values())))
        line = f"{section}: {counts}"
        if failed:
            line += f"; FAILED {len(failed)}: {', '.join(failed)}"
        lines.append(line)
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _OUTCOMES:
        return
    terminalreporter.section(f"keras-opt conformance: {implementation_name(config)}")
    terminalreporter.write_line("verdict per level (FAIL: wrong; LIMIT: not offered; WARN: correct but wasteful "
                                "or noisy; PASS):")
    for line in verdict.level_lines(_OUTCOMES):
        terminalreporter.write_line(f"  {line}")
    for check, outcome in sorted(_OUTCOMES.items()):
        if outcome["outcome"] == "warn":
            terminalreporter.write_line(f"  WARN {check}: {outcome['message'].splitlines()[0][:300]}")
    terminalreporter.write_line("by section:")
    for line in section_summary(_OUTCOMES):
        terminalreporter.write_line(f"  {line}")


def pytest_sessionfinish(session, exitstatus):
    _write_outcomes(session.config)
