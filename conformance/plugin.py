"""pytest plugin: choose the implementation, show it, apply an adopter's xfails, record outcomes."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import warnings
from pathlib import Path

import pytest

from .spy import Observer

REFERENCE = "keras_opt_ref.scipy_optimizer"
_SUITE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("keras-opt conformance")
    group.addoption("--impl", default=None, help="module exposing make_train_function (or env KERAS_OPT_IMPL)")
    group.addoption("--xfails-file", default=None, help="file of test ids expected to fail, one per line")
    group.addoption("--conformance-json", default=None, help="write each test's outcome and message here")


def implementation_name(config) -> str | None:
    name = config.getoption("--impl") or os.environ.get("KERAS_OPT_IMPL")
    if name:
        return name
    # The reference is the default only inside this repository.
    if (Path(str(config.rootpath)) / "keras_opt_ref" / "scipy_optimizer.py").exists():
        return REFERENCE
    return None


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
    import tensorflow as tf

    keras = _keras_module()
    name = implementation_name(config)
    impl = _describe(name) if name else "NONE (name one with --impl MODULE or KERAS_OPT_IMPL)"
    return (
        f"keras-opt conformance: implementation {impl}; "
        f"{keras.__name__} {keras.__version__}; tensorflow {tf.__version__}"
    )


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
    module = importlib.import_module(name)
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


def _in_suite(item) -> bool:
    return Path(str(item.fspath)).resolve().parent == _SUITE


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
            if item.nodeid.endswith(entry) or item.nodeid.split("::", 1)[-1] == entry or entry == item.name:
                item.add_marker(pytest.mark.xfail(reason=f"listed in {path}", strict=False))
                used.add(entry)
    for entry in entries:
        if entry not in used:
            warnings.warn(f"xfails file {path}: entry {entry!r} matches no test", UserWarning, stacklevel=1)


_OUTCOMES: dict[str, dict[str, str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _in_suite(item):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if hasattr(report, "wasxfail"):
            state = "xpass" if report.passed else "xfail"
        else:
            state = {"passed": "pass", "failed": "fail", "skipped": "skip"}[report.outcome]
        message = ""
        if report.failed and call.excinfo is not None:
            message = call.excinfo.exconly().splitlines()[0][:300]
        section = Path(str(item.fspath)).stem.removeprefix("test_")
        _OUTCOMES[f"{section}::{item.name}"] = {"outcome": state, "message": message}


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--conformance-json")
    if path:
        name = implementation_name(session.config)
        Path(path).write_text(json.dumps({"implementation": name, "tests": _OUTCOMES}, indent=1))
