"""Per-test hygiene for the suite (fixtures `impl`, `observe`, `keras` come from the plugin)."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# KERAS_OPT_STRATEGY=mirrored: every check runs inside a tf.distribute.MirroredStrategy's scope over
# two logical CPU devices (configured here, before TensorFlow initializes its devices), so the
# implementation is handed models whose variables are mirrored.
STRATEGY = os.environ.get("KERAS_OPT_STRATEGY", "")
if STRATEGY:
    if STRATEGY != "mirrored":
        raise ValueError(f"KERAS_OPT_STRATEGY={STRATEGY!r}: the suite knows 'mirrored' only")
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def _fresh_keras(keras, request):
    offers = request.getfixturevalue("offers")
    try:
        with _strategy_scope():
            request.getfixturevalue("offered")  # LIMIT if not offered; a probe fit (once per level) first
    finally:
        if offers.probed:  # also when the check ends LIMIT here
            keras.backend.clear_session()  # outside the strategy scope: clearing inside it loses the scope's state
    with _strategy_scope():
        keras.utils.set_random_seed(7)
        yield
    keras.backend.clear_session()


def _strategy_scope():
    if not STRATEGY:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]]).scope()


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
