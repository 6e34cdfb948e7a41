"""What a run shows while it goes: one line per iteration when verbose, the stop reason, the trace,
and each iteration handed on as Keras events (``events.Events``)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import scipy.optimize

__all__ = ["LiveLine", "Progress"]


class Progress:
    """scipy callback: per-iteration line when verbose, the stop reason, and the iteration's Keras
    events (``events``, an ``events.Events`` or None)."""

    def __init__(self, owner: Any, objective: Any, events: Any = None) -> None:
        self.owner, self.objective = owner, objective
        self.events = events if events is not None and events.active else None
        # On several workers only the chief prints (each runs the same loop on the same numbers).
        self.verbose = owner.verbose and getattr(objective, "is_chief", True)
        self.iteration = 0
        self.started = 0.0
        self.trace: list[tuple[float, float]] = [(0.0, math.nan)]

    def start(self, x0: np.ndarray) -> None:
        self.started = time.perf_counter()
        cached = self.objective.cached(x0)
        self.trace = [(0.0, cached[0] if cached is not None else math.nan)]
        if self.events is not None:
            self.events.begin()
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
        wanted = fun is None or verbose or self.events is not None
        cached = obj.cached(x) if wanted else None  # the memo: no extra evaluation
        if fun is None and cached is not None:
            fun = cached[0]
        fun = math.nan if fun is None else float(fun)
        self.trace.append((elapsed, fun))
        gradient = cached[1] if cached is not None else None
        if verbose:
            grad_norm = float(np.linalg.norm(gradient)) if gradient is not None else math.nan
            _print(f"{self.iteration:>6} {fun:>14.8g} {grad_norm:>10.3e} {obj.nfev:>6} {obj.nhvp:>6}")
        if self.events is not None:  # last: it may end the run (events.StopRequested)
            self.events.iteration(self.iteration, np.asarray(x, dtype=np.float64), fun, gradient)

    def stop(self, result: Any) -> None:
        if self.events is not None:
            self.events.end(self.iteration, float(result.fun))
        if self.verbose:
            _print(
                f"{self.owner.method.name} stopped: {result.get('message', '')} "
                f"(loss {float(result.fun):.8g}, nit={result['nit']}, nfev={result['nfev']}, "
                f"njev={result['njev']}, nhev={result['nhev']}, {time.perf_counter() - self.started:.3f} s)"
            )


class LiveLine:
    """One progress line per run in the look of Keras's Progbar, rewritten in place at each iteration
    (``  37/200 ━━━━━━━━━━━━━━━━━━━━ 1s 3ms/iteration - loss: 0.0123 - nfev: 40``). Keras 3's own
    Progbar prints every value as a float (``nfev: 35.0000``), so the line is drawn here. Where the
    output is not a terminal or a notebook, a line is printed at most once a second, and the last."""

    WIDTH = 20

    def __init__(self, target: int | None, stream: Any = None) -> None:
        self.target, self.stream = target, stream or sys.stdout
        self.dynamic = bool(getattr(self.stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules
        self.started = time.perf_counter()
        self.last_shown, self.width = -math.inf, 0

    def update(self, current: int, values: dict[str, Any], final: bool = False) -> None:
        now = time.perf_counter()
        interval = 0.05 if self.dynamic else 1.0
        if not final and now - self.last_shown < interval:
            return
        self.last_shown = now
        elapsed = now - self.started
        if self.target:
            digits = len(str(self.target))
            filled = int(self.WIDTH * min(current / self.target, 1.0))
            bar = f"{current:>{digits}}/{self.target} " + "\u2501" * filled + "\u2500" * (self.WIDTH - filled)
        else:
            bar = f"{current}"
        per = elapsed / current if current else 0.0
        unit = f"{per * 1e3:.0f}ms" if per < 1 else f"{per:.1f}s"
        line = f"{bar} {elapsed:.0f}s {unit}/iteration" + "".join(f" - {k}: {_format(v)}" for k, v in values.items())
        if self.dynamic:
            pad = " " * max(self.width - len(line), 0)
            self.stream.write("\r" + line + pad + ("\n" if final else ""))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _format(value: Any) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    return f"{value:.4f}" if 1e-3 < abs(value) < 1e4 else f"{value:.4e}"


def _print(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
