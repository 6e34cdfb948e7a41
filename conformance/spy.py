"""Black-box observation: record what an implementation hands to scipy.optimize."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize


@dataclass
class Call:
    """One ``minimize`` (or ``least_squares``) call as the implementation made it."""

    kind: str
    method: str
    fun: Any
    x0: np.ndarray
    kwargs: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    counts: dict[str, int] = field(default_factory=dict)  # calls scipy made during the run

    @property
    def jac(self):
        return self.kwargs.get("jac")

    @property
    def hess(self):
        return self.kwargs.get("hess")

    @property
    def hessp(self):
        return self.kwargs.get("hessp")

    @property
    def bounds(self):
        return self.kwargs.get("bounds")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.kwargs.get("options") or {})

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        """least_squares: the Jacobian handed over at x, as a dense matrix (operators applied to I)."""
        if not callable(self.jac):
            raise AssertionError(f"{self.method}: no Jacobian callable was handed to least_squares (got {self.jac!r})")
        J = self.jac(np.array(x, dtype=np.float64))
        if hasattr(J, "matmat"):
            J = J.matmat(np.eye(J.shape[1]))
        return np.asarray(J.toarray() if hasattr(J, "toarray") else J, dtype=np.float64)

    def value(self, x: np.ndarray) -> float:
        out = self.fun(np.array(x, dtype=np.float64))
        return float(out[0] if self.jac is True else out)

    def gradient(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float64)
        if self.jac is True:
            return np.asarray(self.fun(x)[1])
        if callable(self.jac):
            return np.asarray(self.jac(x))
        raise AssertionError(f"{self.method}: no gradient was handed to scipy")

    def hvp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        x, p = np.array(x, dtype=np.float64), np.array(p, dtype=np.float64)
        if callable(self.hessp):
            return np.asarray(self.hessp(x, p))
        if callable(self.hess):
            return np.asarray(self.hess(x)) @ p
        raise AssertionError(f"{self.method}: neither hess nor hessp was handed to scipy")


def _counting(fn, counts: dict[str, int], name: str):
    counts.setdefault(name, 0)

    def counted(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)

    return counted


class Observer:
    """Context manager wrapping scipy's minimize/least_squares, also where imported by name."""

    def __init__(self, impl_module_name: str) -> None:
        self.impl = impl_module_name.split(".")[0]
        self.calls: list[Call] = []
        self._patched: list[tuple[Any, str, Any]] = []

    @property
    def last(self) -> Call:
        assert self.calls, "the implementation never called scipy.optimize.minimize/least_squares"
        return self.calls[-1]

    def _wrap(self, kind: str, real):
        def observed(fun, x0, *args, **kwargs):
            if args:  # minimize(fun, x0, args, method, jac, hess, hessp, bounds, ...)
                names = ("args", "method", "jac", "hess", "hessp", "bounds", "constraints", "tol", "callback",
                         "options") if kind == "minimize" else ("jac", "bounds", "method")
                kwargs.update(zip(names, args, strict=False))
            call = Call(kind, str(kwargs.get("method", "")), fun, np.array(x0, dtype=np.float64, copy=True),
                        dict(kwargs))
            self.calls.append(call)
            counted = dict(kwargs)
            for name in ("jac", "hess", "hessp"):
                if callable(kwargs.get(name)):
                    counted[name] = _counting(kwargs[name], call.counts, name)
            call.result = real(_counting(fun, call.counts, "fun"), x0, **counted)
            return call.result

        observed.__wrapped_by_conformance__ = True
        return observed

    def __enter__(self) -> Observer:
        reals = {"minimize": scipy.optimize.minimize, "least_squares": scipy.optimize.least_squares}
        targets = [scipy.optimize] + [
            module for name, module in list(sys.modules.items())
            if module is not None and (name == self.impl or name.startswith(self.impl + "."))
        ]
        for module in targets:
            for attr, real in reals.items():
                if getattr(module, attr, None) is real:
                    self._patched.append((module, attr, real))
                    setattr(module, attr, self._wrap(attr, real))
        return self

    def __exit__(self, *exc) -> None:
        for module, attr, real in reversed(self._patched):
            setattr(module, attr, real)
        self._patched.clear()
