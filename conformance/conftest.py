"""Per-test hygiene for the suite (fixtures `impl`, `observe`, `keras` come from the plugin)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def _fresh_keras(keras):
    keras.utils.set_random_seed(7)
    yield
    keras.backend.clear_session()


@pytest.fixture
def float64(keras):
    old = keras.backend.floatx()
    keras.backend.set_floatx("float64")
    yield
    keras.backend.set_floatx(old)


@pytest.fixture
def steps(keras):
    """Finite-difference steps and tolerances for the precision this backend's float64 models
    really compute in (``truth.working_precision``)."""
    from .truth import Steps, working_precision

    return Steps(working_precision(keras))  # a few microseconds: a 7-element tanh
