"""The objective's settings: one object, checked once, shared by every backend.

Every value is checked before any work, with a message naming the setting, what it must be and
what was given. ``hvp_mode=None`` leaves the choice to the backend (``Objective.default_hvp_mode``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_DATA_BYTES",
    "DEFAULT_MAX_HESSIAN_PARAMS",
    "DEFAULT_MAX_JACOBIAN_BYTES",
    "HVP_MODES",
    "LOSS_OVER_ROWS",
    "Settings",
    "check_whole",
]

DEFAULT_CHUNK_SIZE = 65536
DEFAULT_MAX_HESSIAN_PARAMS = 5000
DEFAULT_MAX_DATA_BYTES = 4 * 2**30
DEFAULT_MAX_JACOBIAN_BYTES = 512 * 2**20
HVP_MODES = ("reverse-over-reverse", "forward-over-reverse")
LOSS_OVER_ROWS = ("mean", "sum")  # what a user may declare about a loss whose terms are unknown

# Whole-number settings and the least value each may take.
_WHOLE = {"chunk_size": 1, "max_jacobian_bytes": 1, "max_data_bytes": 1, "max_hessian_params": 0}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every objective is configured with.

    chunk_size
        Rows per chunk of data evaluated at once; bounds memory for large data.
    jit_compile
        Compile the evaluations (TensorFlow: XLA; JAX: ``jax.jit``). ``None`` (default): compile,
        and on TensorFlow fall back to plain graphs with a warning if XLA fails on the model.
    hvp_mode
        ``"reverse-over-reverse"``, ``"forward-over-reverse"`` or ``None`` (the backend's default).
    max_hessian_params
        Largest number of weights for which a dense Hessian is built.
    deterministic
        Accept stochastic layers (Dropout, noise), evaluated in inference mode.
    max_data_bytes
        Largest training set, in bytes as dense arrays, held in memory; larger data is refused.
    max_jacobian_bytes
        Largest dense Jacobian of the residuals (least squares).
    loss_over_rows
        What the user declares about a loss whose terms are unknown here (an overridden
        ``compute_loss``, a custom loss that may reduce over the batch, ``add_loss`` terms):
        ``"mean"``, a mean over the rows of the data plus terms that do not depend on the data
        (each chunk weighted by its share of the rows), or ``"sum"``, a sum over the rows
        (chunks add up). ``None`` (default): only the rules Keras's configuration shows are used,
        and such a loss is evaluated in one piece. A declaration is measured against one piece
        before any optimization (``base.checks.check_declared_rule``) and refused if it does not add up.
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    jit_compile: bool | None = None
    hvp_mode: str | None = None
    max_hessian_params: int = DEFAULT_MAX_HESSIAN_PARAMS
    deterministic: bool = False
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
    max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES
    loss_over_rows: str | None = None

    @classmethod
    def checked(cls, **settings: Any) -> Settings:
        """Settings from keywords, each value checked (TypeError/ValueError naming it)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; the objective's settings are {sorted(known)}")
        out = {}
        for name, value in settings.items():
            if name in ("deterministic", "jit_compile"):
                if not (isinstance(value, (bool, np.bool_)) or (value is None and name == "jit_compile")):
                    allowed = "True, False or None" if name == "jit_compile" else "True or False"
                    raise TypeError(f"{name} must be {allowed}, got {value!r}")
                out[name] = value if value is None else bool(value)
            elif name == "hvp_mode":
                if value is not None and value not in HVP_MODES:
                    raise ValueError(f"Unknown hvp_mode {value!r}; choose one of {HVP_MODES} (None: the backend's)")
                out[name] = value
            elif name == "loss_over_rows":
                if value is not None and value not in LOSS_OVER_ROWS:
                    raise ValueError(
                        f"Unknown loss_over_rows {value!r}; choose 'mean' (a mean over the rows of the data, plus "
                        "terms that do not depend on the data), 'sum' (a sum over the rows) or None (not declared)"
                    )
                out[name] = value
            else:
                out[name] = check_whole(name, value, _WHOLE[name])
        return cls(**out)


def check_whole(name: str, value: Any, least: int | None) -> int:
    """``value`` as an int if it is a whole number ``>= least`` (integral floats such as ``1e3``
    included), else a TypeError/ValueError naming ``name``."""
    what = {1: "a positive integer", None: "an integer"}.get(least, f"an integer >= {least}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {value!r} of type {type(value).__name__}")
    if not (isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())):
        raise ValueError(f"{name} must be {what}, got {value!r} (not a whole number)")
    if least is not None and int(value) < least:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)
