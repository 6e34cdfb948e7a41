"""Levels of conformance: a core contract every implementation must meet, and optional levels an
implementation may not offer.

- ``core``: the objective and its gradient (L-BFGS-B), the fit contract, where the weights end up,
  and the bad input that would corrupt results.
- ``methods``: the other ``scipy.optimize.minimize`` methods that need no Hessian.
- ``curvature``: Hessian-vector products and dense Hessians (Newton-CG, trust-ncg, trust-krylov,
  trust-exact, dogleg).
- ``bounds``: bounds and Keras constraints.
- ``least_squares``: residuals and Jacobians for ``scipy.optimize.least_squares`` (lm, trf, dogbox).
- ``extras``: what the reference adds to History: the counts ``nit``, ``nfev``, ``njev``, ``nhev``.

A check belongs to one level (``@pytest.mark.level(...)``; ``core`` when unmarked) and, when it is
parametrized by ``method``, also needs that method. An optional level or a method is *offered*
unless the implementation refuses it on purpose -- a ValueError/TypeError/NotImplementedError raised
before any scipy call -- when the suite first asks (one probe fit per level or method, on a tiny
problem), or unless ``--levels`` leaves it out. A check whose level or method is not offered ends
LIMIT, with the refusal it met; an implementation that crashes on it, or lets scipy reject what it
handed over, offers it and is checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problems import HESS_METHODS, HESSP_METHODS, LEAST_SQUARES

LEVELS = ("core", "methods", "curvature", "bounds", "least_squares", "extras")
DESCRIPTIONS = {
    "core": "objective, gradient, fit contract, weights, bad input that would corrupt results",
    "methods": "the other minimize methods that need no Hessian",
    "curvature": "Hessian-vector products and dense Hessians",
    "bounds": "bounds and Keras constraints",
    "least_squares": "scipy.optimize.least_squares: residuals and Jacobians (lm, trf, dogbox)",
    "extras": "History counts nit/nfev/njev/nhev",
}
CORE_METHOD = "L-BFGS-B"
COUNTS = ("nit", "nfev", "njev", "nhev")
# Refusals on purpose: what "not offered" may raise (crashes such as AttributeError are not refusals).
REFUSALS = (ValueError, TypeError, NotImplementedError)


def method_level(method: str) -> str:
    if method == CORE_METHOD:
        return "core"
    if method in LEAST_SQUARES:
        return "least_squares"
    if method in HESSP_METHODS or method in HESS_METHODS:
        return "curvature"
    return "methods"



def parse(text: str | None) -> tuple[str, ...] | None:
    """``--levels``: None or "auto" means detect; else a comma list of level names (core is always in)."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    if text.strip().lower() == "all":
        return LEVELS
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise ValueError(f"--levels: unknown level(s) {unknown}; the levels are {', '.join(LEVELS)}")
    return tuple(dict.fromkeys(("core", *names)))


@dataclass
class Offer:
    offered: bool
    why: str = ""


class Offers:
    """What the implementation offers, asked once per level or method (cached for the session)."""

    def __init__(self, impl, keras, observer_class, selected: tuple[str, ...] | None) -> None:
        self.impl, self.keras, self.observer_class, self.selected = impl, keras, observer_class, selected
        self._cache: dict[str, Offer] = {}
        self.probed = False  # whether a probe fit ran since the caller last reset it

    def of(self, level: str, method: str | None) -> Offer:
        """Whether a check of ``level`` (parametrized by ``method``, if any) can run."""
        for need in (level, method_level(method) if method else None):
            if need and self.selected is not None and need not in self.selected:
                return Offer(False, f"level {need!r} not selected (--levels {','.join(self.selected)})")
        if level != "core":
            offer = self._probe(f"level:{level}")
            if not offer.offered:
                return offer
        if method and method != CORE_METHOD:
            return self._probe(f"method:{method}")
        return Offer(True)

    def _probe(self, key: str) -> Offer:
        if key not in self._cache:
            self._cache[key] = Offer(True) if self.selected is not None else self._ask(key)
        return self._cache[key]

    def _ask(self, key: str) -> Offer:
        kind, name = key.split(":", 1)
        if kind == "level" and name in ("methods", "curvature", "least_squares"):
            return Offer(True)  # decided per method
        self.probed = True  # the caller clears Keras's session before the check (outside any strategy scope)
        keras = self.keras
        rng = np.random.default_rng(0)
        X = rng.normal(size=(24, 2))
        y = X @ np.array([[1.0], [-0.5]]) + 0.1
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(loss="mse")
        method, extra = CORE_METHOD, {}
        if kind == "method":
            method = name
        elif name == "bounds":
            extra = {"bounds": (-5.0, 5.0)}
        what = f"method={method!r}" + (", bounds=(-5, 5)" if extra else "")
        with self.observer_class(self.impl.__name__) as observer:
            try:
                model.train_function = self.impl.make_train_function(model, method=method, maxiter=2, **extra)
                history = model.fit(X, y, epochs=1, batch_size=24, verbose=0)
            except REFUSALS as exc:
                if observer.calls:
                    return Offer(True)  # scipy got it: offered (and its checks will say what went wrong)
                return Offer(False, f"{what} refused: {type(exc).__name__}: {_short(exc)}")
            except Exception:  # noqa: BLE001 -- a crash is no refusal: offered, and checked
                return Offer(True)
        if name == "extras":
            logs = getattr(history, "history", {}) or {}
            if not any(k in logs for k in COUNTS):
                return Offer(False, f"History has none of {', '.join(COUNTS)} (keys: {sorted(logs)})")
        return Offer(True)


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
