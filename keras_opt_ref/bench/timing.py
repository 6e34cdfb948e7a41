"""Timing round by round, with no framework imported: the building blocks of every per-call figure.

Within a round each function is timed back to back (best of ``repeat`` calls), so that a ratio compares
calls made under the same machine load; figures are the median over the rounds with its min-max (:class:`Stat`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Stat", "cycling_points", "round_robin"]


@dataclass(frozen=True)
class Stat:
    """Median with min-max over rounds."""

    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        v = np.asarray(values, dtype=float)
        return cls(float(np.median(v)), float(v.min()), float(v.max()))

    def scaled(self, factor: float) -> Stat:
        return Stat(self.median * factor, self.lo * factor, self.hi * factor)

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.lo:.3g}-{self.hi:.3g}]"


def round_robin(fns: dict[str, Callable[[], Any]], rounds: int = 15, repeat: int = 5) -> dict[str, np.ndarray]:
    """Seconds per call of each function, per round (best of ``repeat``), timed back to back."""
    for fn in fns.values():  # warm up: tracing and compilation are not per-call costs
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best = math.inf
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    return {name: np.array(t) for name, t in times.items()}


def cycling_points(x0: np.ndarray, count: int, seed: int = 0) -> Callable[[], np.ndarray]:
    """A cycle of distinct points near ``x0``: every call is a memo miss."""
    rng = np.random.default_rng(seed)
    points = [x0 + 1e-3 * rng.normal(size=x0.size) for _ in range(count)]
    state = {"i": 0}

    def next_point() -> np.ndarray:
        state["i"] = (state["i"] + 1) % count
        return points[state["i"]]

    return next_point
