"""One table decides dispatch: what each ``scipy.optimize.minimize`` method is handed.

``derivatives`` says which callables a method uses (scipy warns about any other), ``bounds``
whether it honours bounds, ``options`` the solver options it accepts (checked against scipy
by the tests, so a scipy change shows up as a failing test, not a silent drop).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize

from .flat import FlatVariables

__all__ = [
    "ALL_METHOD_NAMES",
    "LEAST_SQUARES_METHODS",
    "METHODS",
    "Method",
    "resolve_method",
    "scipy_bounds",
    "solver_options",
]

_TRUST = frozenset({"initial_trust_radius", "max_trust_radius", "eta", "gtol", "maxiter", "disp", "return_all"})


@dataclass(frozen=True)
class Method:
    name: str  # scipy's spelling
    jac: bool  # takes the gradient
    hess: str | None  # None, "hessp" (Hessian-vector products) or "hess" (dense matrix)
    bounds: bool
    options: frozenset[str]
    least_squares: bool = False  # scipy.optimize.least_squares on residuals, not minimize

    @property
    def uses_dense_hessian(self) -> bool:
        return self.hess == "hess"


def _m(name: str, jac: bool, hess: str | None, bounds: bool, options: str | frozenset[str]) -> Method:
    opts = frozenset(options.split()) if isinstance(options, str) else options
    return Method(name, jac, hess, bounds, opts)


METHODS: tuple[Method, ...] = (
    _m("Nelder-Mead", False, None, True, "maxiter maxfev disp return_all initial_simplex xatol fatol adaptive"),
    _m("Powell", False, None, True, "xtol ftol maxiter maxfev disp direc return_all"),
    _m("CG", True, None, False, "gtol norm eps maxiter disp return_all finite_diff_rel_step c1 c2 workers"),
    _m("BFGS", True, None, False,
       "gtol norm eps maxiter disp return_all finite_diff_rel_step xrtol c1 c2 hess_inv0 workers"),
    _m("Newton-CG", True, "hessp", False, "xtol eps maxiter disp return_all c1 c2 workers"),
    _m("L-BFGS-B", True, None, True,
       "disp maxcor ftol gtol eps maxfun maxiter iprint maxls finite_diff_rel_step workers"),
    _m("TNC", True, None, True,
       "eps scale offset mesg_num maxCGit eta stepmx accuracy minfev ftol xtol gtol rescale disp "
       "finite_diff_rel_step maxfun workers"),
    _m("COBYLA", False, None, True, "rhobeg tol maxiter disp catol f_target"),
    _m("COBYQA", False, None, True,
       "disp maxfev maxiter f_target feasibility_tol initial_tr_radius final_tr_radius scale"),
    _m("SLSQP", True, None, True, "maxiter ftol iprint disp eps finite_diff_rel_step workers"),
    _m("trust-constr", True, "hessp", True,
       "xtol gtol barrier_tol sparse_jacobian maxiter verbose finite_diff_rel_step "
       "initial_constr_penalty initial_tr_radius initial_barrier_parameter "
       "initial_barrier_tolerance factorization_method disp workers"),
    _m("dogleg", True, "hess", False, _TRUST),
    _m("trust-ncg", True, "hessp", False, _TRUST),
    _m("trust-exact", True, "hess", False, _TRUST | {"subproblem_maxiter"}),
    _m("trust-krylov", True, "hessp", False, _TRUST | {"inexact"}),
)
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)

_LSQ = "ftol xtol gtol x_scale max_nfev"
LEAST_SQUARES_METHODS: tuple[Method, ...] = (
    Method("lm", True, None, False, frozenset(_LSQ.split()), least_squares=True),
    Method("trf", True, None, True, frozenset(f"{_LSQ} loss f_scale tr_solver tr_options".split()), True),
    Method("dogbox", True, None, True, frozenset(f"{_LSQ} loss f_scale tr_solver tr_options".split()), True),
)
# Options of least_squares that only serve finite differences: refused, the Jacobian is exact.
FINITE_DIFFERENCE_OPTIONS = frozenset({"diff_step", "jac_sparsity"})
ALL_METHOD_NAMES: tuple[str, ...] = METHOD_NAMES + tuple(m.name for m in LEAST_SQUARES_METHODS)
_BY_KEY = {m.name.lower(): m for m in METHODS + LEAST_SQUARES_METHODS}

# keras-opt spelled the iteration limit `maxiter` for every method; TNC calls it `maxfun`.
_MAXITER_ALIAS = {"TNC": "maxfun", "lm": "max_nfev", "trf": "max_nfev", "dogbox": "max_nfev"}


def resolve_method(method: str) -> Method:
    """Look a method up case-insensitively; unknown names list the valid ones."""
    found = _BY_KEY.get(str(method).lower()) if isinstance(method, str) else None
    if found is None:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(ALL_METHOD_NAMES)}")
    return found


def solver_options(method: Method, maxiter: int | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options scipy gets. Unused ones are dropped with a warning naming the valid ones."""
    options = dict(options)
    exact = sorted(FINITE_DIFFERENCE_OPTIONS & set(options)) if method.least_squares else []
    if exact:
        raise ValueError(
            f"Option(s) {exact} configure finite differences; the Jacobian here is exact (autodiff). Remove them."
        )
    if maxiter is not None:
        options[_MAXITER_ALIAS.get(method.name, "maxiter")] = int(maxiter)
    unused = sorted(set(options) - method.options)
    if unused:
        warnings.warn(
            f"Option(s) {unused} are not used by method {method.name!r} and were ignored; "
            f"it uses: {sorted(method.options)}",
            UserWarning,
            stacklevel=4,  # the caller of make_train_function
        )
    return {k: v for k, v in options.items() if k in method.options}


BoundsSpec = Any  # (lo, hi) | {variable name: (lo, hi)} | [(lo, hi) per variable] | None


def scipy_bounds(spec: BoundsSpec, flat: FlatVariables) -> scipy.optimize.Bounds | None:
    """Lower/upper bounds on the flat vector from a user spec plus Keras ``NonNeg`` constraints.

    ``spec`` is one ``(lo, hi)`` pair for all weights, a dict from variable name (Keras 3
    path or tf-keras name; a suffix such as ``"dense/kernel"`` suffices if unique) to a
    pair, or a sequence with one pair per trainable variable. ``None`` means unbounded;
    ``lo``/``hi`` may be scalars or arrays broadcastable to the variable's shape.
    """
    lower = np.full(flat.size, -np.inf)
    upper = np.full(flat.size, np.inf)
    per_variable: list[Any] = [None] * len(flat)
    if spec is None:
        pass
    elif isinstance(spec, Mapping):
        for key, pair in spec.items():
            per_variable[_variable_index(str(key), flat)] = pair
    elif _is_pair(spec):
        per_variable = [spec] * len(flat)
    elif isinstance(spec, Sequence) and len(spec) == len(flat) and all(_is_pair(p) or p is None for p in spec):
        per_variable = list(spec)
    else:
        raise ValueError(
            "bounds must be one (lo, hi) pair for all weights, a dict {variable name: (lo, hi)}, "
            f"or a list of {len(flat)} (lo, hi) pairs, one per trainable variable "
            f"({list(flat.names)}); got {spec!r}"
        )
    for i, pair in enumerate(per_variable):
        if pair is None:
            continue
        lo, hi = pair
        where = flat.slice(i)
        if lo is not None:
            lower[where] = np.broadcast_to(np.asarray(lo, dtype=float), flat.shapes[i]).ravel()
        if hi is not None:
            upper[where] = np.broadcast_to(np.asarray(hi, dtype=float), flat.shapes[i]).ravel()
    for i in nonneg_variables(flat):
        lower[flat.slice(i)] = np.maximum(lower[flat.slice(i)], 0.0)
    if np.any(lower > upper):
        raise ValueError("bounds have lo > hi for some weights")
    if np.all(np.isneginf(lower)) and np.all(np.isposinf(upper)):
        return None
    return scipy.optimize.Bounds(lower, upper)


def constrained_variables(flat: FlatVariables) -> dict[int, str]:
    """Index -> constraint class name for variables with a Keras constraint."""
    out = {}
    for i, v in enumerate(flat.variables):
        constraint = getattr(v, "constraint", None)
        if constraint is not None:
            out[i] = type(constraint).__name__
    return out


def nonneg_variables(flat: FlatVariables) -> list[int]:
    return [i for i, name in constrained_variables(flat).items() if name == "NonNeg"]


def _is_pair(p: Any) -> bool:
    return isinstance(p, tuple) and len(p) == 2 and all(
        e is None or np.ndim(e) == 0 or isinstance(e, (np.ndarray, list)) for e in p
    )


def _variable_index(key: str, flat: FlatVariables) -> int:
    exact = [i for i, name in enumerate(flat.names) if name == key]
    found = exact or [i for i, name in enumerate(flat.names) if name.endswith("/" + key) or name.endswith(key)]
    if len(found) != 1:
        what = "matches no" if not found else "matches more than one"
        raise ValueError(f"bounds key {key!r} {what} trainable variable; names are {list(flat.names)}")
    return found[0]
