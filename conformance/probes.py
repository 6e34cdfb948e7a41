"""Shared probes that rule out one cause before a check blames another.

- Precision: a value that matches the float64 truth only to float32 precision is "computed in
  float32", never a stale memo or an ignored x.
- Which point is this: a value is compared with the implementation's own values at each candidate
  point, each taken fresh (after a far-away reset point, then f, then the gradient at the point
  itself, the order scipy uses), so a stale answer is named by the point it belongs to, and precision
  cannot pass for state.
- Colliding points: pairs that a cheap memo key confuses (same sum, same norm, same multiset of
  entries, equal under ``np.allclose``), on a dyadic grid so that every sum and norm is exact in any
  order.
- Where the weights are: which of result.x, the best point evaluated, the last point evaluated and the
  start the model's weights equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

FLOAT64_RTOL = 1e-11  # float64 sums of O(100) terms in another order agree far better than this
FLOAT32_RTOL = 3e-6  # float32 arithmetic over O(100) terms: rounding up to ~n eps32
SAME_RTOL = 1e-9  # the same deterministic implementation at the same point, by another call order


def precision_of(actual: float, expected: float) -> str:
    """``float64``, ``float32`` (matches only to float32 precision) or ``wrong``."""
    rel = abs(actual - expected) / max(abs(expected), 1e-300)
    if rel <= FLOAT64_RTOL:
        return "float64"
    return "float32" if rel <= FLOAT32_RTOL else "wrong"


def float32_cause(what: str, actual: float, expected: float, truth: str) -> str:
    rel = abs(actual - expected) / max(abs(expected), 1e-300)
    return (
        f"{what} = {actual!r} matches {truth} = {expected!r} only to float32 precision (relative difference "
        f"{rel:.2g}; float64 arithmetic agrees to better than {FLOAT64_RTOL:g}): it is computed in float32, not in "
        "the float64 of the model"
    )


def require_float64(call: Any, truth_at: Callable[[np.ndarray], float], w: np.ndarray, steps: Any,
                    checked: str) -> None:
    """Before a check that differences ``f`` at float64 steps: ``f`` must carry float64 precision where the
    backend computes float64 models in float64; if it matches the truth only to float32, that is the cause."""
    if steps.precision != "float64":
        return
    value, truth = call.value(w), truth_at(w)
    if precision_of(value, truth) == "float32":
        raise AssertionError(
            f"{float32_cause('scipy f(x)', value, truth, 'model.evaluate(batch_size=N) on the float64 model')}. "
            f"So {checked} cannot be checked against float64 finite differences (they would difference float32 "
            "rounding noise). Compute the loss and its derivatives in the model's dtype."
        )


def require_float64_at_start(call: Any, truth_at_start: float, steps: Any, checked: str, truth: str) -> None:
    """``require_float64`` for an x whose layout is not yet known to be the interface's: f at scipy's own x0 (the
    model's start weights in whatever layout the implementation chose) against the truth at the start weights,
    and whether every value f hands scipy is a float32 number (a float64 computation gives one with probability
    ~2**-29 per value)."""
    if steps.precision != "float64":
        return
    value = float(call.value(call.x0))
    if precision_of(value, truth_at_start) == "float32":
        cause = float32_cause("scipy f(x0)", value, truth_at_start, truth)
    else:
        rng = np.random.default_rng(31)
        values = [value] + [float(call.value(call.x0 + 0.05 * rng.normal(size=call.x0.size))) for _ in range(3)]
        if not all(np.isfinite(v) and float(np.float32(v)) == v for v in values):
            return
        listed = ", ".join(f"{v!r}" for v in values)
        cause = (f"every value scipy's f returned at x0 and three points near it ({listed}) is exactly a float32 "
                 "number: it is computed in float32 (or passed through float32), not in the "
                 "float64 of the model")
    raise AssertionError(
        f"{cause}. So {checked} cannot be checked against float64 finite differences (they would difference float32 "
        "rounding noise). Compute the loss and its derivatives in the model's dtype.")


def float32_numbers(vector: Any) -> bool:
    """Whether a vector is float32, or float64 whose (at least 8) non-zero entries are all exactly float32 numbers:
    a float64 computation gives such an entry with probability ~2**-29."""
    a = np.asarray(vector)
    if a.dtype == np.float32:
        return True
    a = a.astype(np.float64).ravel()
    nonzero = a[(a != 0) & np.isfinite(a)]
    return nonzero.size >= 8 and bool(np.all(nonzero.astype(np.float32).astype(np.float64) == nonzero))


def require_float64_vector(vector: Any, steps: Any, what: str, consequence: str) -> None:
    """On a backend that computes float64 models in float64, a derivative handed over in float32 is named as such
    (its float32 rounding, ~1e-7 relative, hides inside finite-difference tolerances but not from this)."""
    if steps.precision == "float64" and float32_numbers(vector):
        dtype = getattr(np.asarray(vector), "dtype", None)
        raise AssertionError(
            f"{what}: every entry is exactly a float32 number (dtype {dtype}): it is computed in float32 (or passed "
            f"through float32), not in the float64 of the model. {consequence}")


# ------------------------------------------------------------------ which point is this
KINDS = ("f", "g", "hvp")


def evaluate(call: Any, kind: str, x: np.ndarray, p: np.ndarray | None) -> np.ndarray:
    if kind == "f":
        return np.asarray(call.value(x), dtype=np.float64)
    if kind == "g":
        return np.asarray(call.gradient(x), dtype=np.float64)
    return np.asarray(call.hvp(x, p), dtype=np.float64)


def fresh(call: Any, kind: str, x: np.ndarray, p: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """``kind`` at ``x`` in scipy's friendliest order: a far-away reset point, then f(x), g(x), then ``kind``."""
    reset = x + 0.7 * np.random.default_rng(1000 + seed).normal(size=x.size)
    call.value(reset)
    call.value(x)
    if call.gradient_route is not None:
        call.gradient(x)
    return evaluate(call, kind, x, p)


def same(a: np.ndarray, b: np.ndarray, rtol: float = SAME_RTOL) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * scale))


def name_point(value: np.ndarray, candidates: dict[str, np.ndarray]) -> str | None:
    for label, expected in candidates.items():
        if same(value, expected):
            return label
    return None


# ------------------------------------------------------------------ colliding points
def dyadic(x: np.ndarray) -> np.ndarray:
    """x on a 2**-20 grid: sums and sums of squares of such numbers are exact in any order."""
    return np.round(np.asarray(x, dtype=np.float64) * 2.0**20) / 2.0**20


def collisions(x: np.ndarray, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Pairs (a, b), a != b, that a cheap memo key cannot tell apart: (description, a, b)."""
    rng = np.random.default_rng(seed)
    a = dyadic(x + 0.05 * rng.normal(size=x.size))
    n = a.size
    i, j = 0, n - 1
    permuted = a[np.roll(np.arange(n), 1)]
    shifted = a.copy()
    shifted[i] += 0.125
    shifted[j] -= 0.125
    flipped = a.copy()
    k = int(np.argmax(np.abs(a)))
    flipped[k] = -flipped[k]
    last = a.copy()
    last[-1] += 0.25
    near = a * (1 + 2e-6) + 2e-9
    pairs = [
        ("a permutation of its entries (same sum, same norm, same sorted values)", a, permuted),
        ("the same sum (+0.125 on one entry, -0.125 on another)", a, shifted),
        ("the same norm (one entry's sign flipped)", a, flipped),
        ("the same entries but the last", a, last),
        ("a change of 2e-6 relative that np.allclose calls equal", a, near),
    ]
    assert np.sum(permuted) == np.sum(a) and np.sum(shifted) == np.sum(a)  # noqa: S101 -- exact by construction
    assert np.linalg.norm(flipped) == np.linalg.norm(a) and np.allclose(near, a)  # noqa: S101
    return [(label, a, b) for label, a, b in pairs if not np.array_equal(a, b)]


def check_collisions(call, sequences, what: str, p=None) -> None:
    """For each pair of colliding points (a, b) and each (first, second) kind: first(a), then second(b) must be
    the implementation's own fresh second(b); if it is second(a), the cheap key is named."""
    for label, a, b in collisions(call.x0):
        for first, second in sequences:
            want, stale = fresh(call, second, b, p), fresh(call, second, a, p, seed=1)
            if same(want, stale, rtol=1e-12):
                continue  # this pair is too close for this implementation to tell apart: no verdict from it
            evaluate(call, first, a, p)
            got = evaluate(call, second, b, p)
            if same(got, want):
                continue
            names = {"f": "f", "g": "the gradient", "hvp": "the Hessian-vector product"}
            if same(got, stale):
                cause = (f"it is {names[second]} at the previous point a: a memo (or a skipped weight assignment) is "
                         f"keyed on a cheap summary of x that these points share ({label}); compare the whole x "
                         "exactly (a copy of it)")
            else:
                cause = "it matches neither point (state from an earlier call leaked into it)"
            raise AssertionError(
                f"{names[first]}(a) then {names[second]}(b), with b = a changed to {label}: {names[second]}(b) "
                f"differs from the implementation's own {names[second]}(b) taken fresh (max difference "
                f"{float(np.max(np.abs(np.asarray(got) - want))):.3g}): {cause}. ({what} probed at colliding points)")


# ------------------------------------------------------------------ where the weights are
def points_equal(w: np.ndarray, x: np.ndarray | None) -> bool:
    """The model's weights hold x (up to rounding x to the variables' float32/float64 dtype)."""
    if x is None:
        return False
    w, x = np.asarray(w, dtype=np.float64), np.asarray(x, dtype=np.float64)
    return w.shape == x.shape and bool(np.all(np.abs(w - x) <= 1e-6 * np.abs(x) + 1e-7))


def which_points(w: np.ndarray, named: dict[str, np.ndarray | None]) -> list[str]:
    return [name for name, x in named.items() if points_equal(w, x)]


def distinct(named: dict[str, np.ndarray | None]) -> bool:
    """Whether the named points are pairwise different (so that the weights can say which one they are)."""
    points = [x for x in named.values() if x is not None]
    return all(not points_equal(a, b) for k, a in enumerate(points) for b in points[k + 1 :])


def named_points(call: Any) -> dict[str, np.ndarray | None]:
    """The points the weights may be at after a run: scipy's result.x, the best and last points evaluated, x0."""
    finite = [(x, f) for x, f in call.evaluated if np.isfinite(f)]
    return {
        "result.x (scipy's returned point)": call.final_x,
        "the best point evaluated": min(finite, key=lambda e: e[1])[0] if finite else None,
        "the last point evaluated": call.evaluated[-1][0] if call.evaluated else None,
        "the start weights": call.x0,
    }


def where(w: np.ndarray, named: dict[str, np.ndarray | None]) -> str:
    """Which of the named points ``w`` equals, in words."""
    found = which_points(w, named)
    return " and ".join(found) if found else f"none of: {', '.join(k for k, v in named.items() if v is not None)}"
