"""One measurement in a fresh Python process: ``python -m <module> <args>``, its result the last JSON line it
prints. The side-by-side and the PINN race run each contender this way, so that none inherits another's
compiled functions, thread pools or memory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["BACKENDS", "backend_env", "installed", "json_row"]

BACKENDS = ("tensorflow", "jax", "torch")  # the Keras backends a child can run on, each its package's name


def json_row(module: str, args: Sequence[str], *, env: dict[str, str], timeout: float,
             drop: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``module`` with ``args`` in a fresh process, with ``env`` over this process's environment and the
    variables in ``drop`` removed; its last printed JSON object, or ``{"failed": why}``."""
    environment = {k: v for k, v in dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env).items() if k not in drop}
    try:
        out = subprocess.run([sys.executable, "-m", module, *args], env=environment, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"no result within {timeout:g} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        return {"failed": f"exit {out.returncode}: {tail}"}
    return json.loads(lines[-1])


def backend_env(backend: str) -> dict[str, str]:
    """The environment of a child on Keras backend ``backend`` (JAX without 64-bit mode: float32 workloads)."""
    return {"KERAS_BACKEND": backend, **({"JAX_ENABLE_X64": "0"} if backend == "jax" else {})}


def installed(backend: str) -> bool:
    """Whether ``backend``'s package is installed here."""
    return importlib.util.find_spec(backend) is not None
