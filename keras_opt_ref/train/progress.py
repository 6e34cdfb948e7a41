"""What a run shows while it goes: one line per iteration when verbose, the stop reason, the trace."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import scipy.optimize

__all__ = ["Progress"]


class Progress:
    """scipy callback: per-iteration line when verbose, and the stop reason."""

    def __init__(self, owner: Any, objective: Any) -> None:
        self.owner, self.objective = owner, objective
        # On several workers only the chief prints (each runs the same loop on the same numbers).
        self.verbose = owner.verbose and getattr(objective, "is_chief", True)
        self.iteration = 0
        self.started = 0.0
        self.trace: list[tuple[float, float]] = [(0.0, math.nan)]

    def start(self, x0: np.ndarray) -> None:
        self.started = time.perf_counter()
        cached = self.objective.cached(x0)
        self.trace = [(0.0, cached[0] if cached is not None else math.nan)]
        if self.verbose:
            obj = self.objective
            _print(
                f"scipy {self.owner.method.name}: {obj.size} weights, {obj.num_samples} samples\n"
                f"{'iter':>6} {'loss':>14} {'|grad|':>10} {'nfev':>6} {'nhvp':>6}"
            )

    def __call__(self, intermediate_result: Any) -> None:
        self.iteration += 1
        elapsed = time.perf_counter() - self.started
        if isinstance(intermediate_result, scipy.optimize.OptimizeResult):
            x, fun = intermediate_result.x, intermediate_result.get("fun")
            if "cost" in intermediate_result:  # least_squares: fun holds the residuals; loss = 2 cost
                fun = 2.0 * float(intermediate_result.cost)
        else:  # TNC, SLSQP and COBYLA pass only x
            x, fun = intermediate_result, None
        obj = self.objective
        verbose = self.verbose
        cached = obj.cached(x) if fun is None or verbose else None  # the memo: no extra evaluation
        if fun is None and cached is not None:
            fun = cached[0]
        fun = math.nan if fun is None else float(fun)
        self.trace.append((elapsed, fun))
        if not verbose:
            return
        grad_norm = float(np.linalg.norm(cached[1])) if cached is not None and cached[1] is not None else math.nan
        _print(f"{self.iteration:>6} {fun:>14.8g} {grad_norm:>10.3e} {obj.nfev:>6} {obj.nhvp:>6}")

    def stop(self, result: Any) -> None:
        if self.verbose:
            _print(
                f"{self.owner.method.name} stopped: {result.get('message', '')} "
                f"(loss {float(result.fun):.8g}, nit={result['nit']}, nfev={result['nfev']}, "
                f"njev={result['njev']}, nhev={result['nhev']}, {time.perf_counter() - self.started:.3f} s)"
            )


def _print(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
