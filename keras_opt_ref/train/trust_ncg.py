"""trust-ncg with its CG-Steihaug subproblem solved inside one compiled call (``subproblem="in-graph"``).

scipy's trust-ncg asks for one Hessian-vector product per CG step, each a round trip from
Python to TensorFlow and a fresh forward and backward pass: on the medium MLP about 39 per
outer iteration. Here scipy keeps its trust-region loop (``_minimize_trust_region``: steps
accepted or rejected, radius updates, stopping rules, messages) and only the subproblem is
swapped: the objective's ``steihaug`` (TensorFlow: ``backends.tensorflow.steihaug``) runs scipy's
CG-Steihaug steps, with the same rules, in one graph over one linearization of the gradient. The
iterates are scipy's own up to float64 summation order (``tests/test_trust_ncg.py`` compares them).

``_minimize_trust_region`` and ``BaseQuadraticSubproblem`` are scipy's internals (stable since
scipy 0.17); a change there fails that test.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from scipy.optimize._trustregion import BaseQuadraticSubproblem, _minimize_trust_region

SUBPROBLEMS = ("scipy", "in-graph")


def in_graph_trust_ncg(objective: Any, calls: Counter[str], stop: type[Exception]) -> Any:
    """A ``scipy.optimize.minimize`` method: trust-ncg whose subproblem is ``objective.steihaug``.

    Every HVP done in the graph is counted in ``calls["hev"]``, as scipy would count its calls;
    a non-finite one raises ``stop`` (never handed to scipy)."""

    class Subproblem(BaseQuadraticSubproblem):
        def __init__(self, x, fun, jac, hess=None, hessp=None):
            super().__init__(x, fun, jac, hess, hessp)
            self._solved: tuple[np.ndarray, np.ndarray] | None = None

        def solve(self, trust_radius):
            p, hits, hp, count = objective.steihaug(self._x, self.fun, self.jac, trust_radius)
            calls["hev"] += abs(count)
            if count < 0:
                raise stop(
                    f"a Hessian-vector product in the in-graph subproblem is not finite (product {calls['hev']}, "
                    f"weights with max |x| = {np.max(np.abs(self._x)) if self._x.size else 0:.3g}). A NaN/Inf is "
                    "never handed to scipy. Bound the weights, take a smaller initial_trust_radius, or make the "
                    "model finite there")
            self._solved = (p, hp)
            return p, hits

        def hessp(self, p):
            if self._solved is not None and np.array_equal(p, self._solved[0]):
                return self._solved[1]  # scipy's m(p) right after solve: computed in the graph
            return super().hessp(p)

    def method(fun, x0, args=(), jac=None, hess=None, hessp=None, bounds=None, constraints=(), callback=None,
               tol=None, **options):
        if tol is not None:
            options.setdefault("gtol", tol)  # what minimize does for trust-ncg
        return _minimize_trust_region(fun, x0, args=args, jac=jac, hessp=hessp, subproblem=Subproblem,
                                      callback=callback, **options)

    method.__name__ = "trust-ncg (in-graph subproblem)"
    return method
