"""One table decides dispatch: what each ``scipy.optimize.minimize`` method is handed.

``derivatives`` says which callables a method uses (scipy warns about any other), ``bounds``
whether it honours bounds, ``options`` the solver options it accepts (checked against scipy
by the tests, so a scipy change shows up as a failing test, not a silent drop).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize

from ..base.flat import FlatVariables
from ..base.settings import check_whole

__all__ = [
    "ALL_METHOD_NAMES",
    "LEAST_SQUARES_METHODS",
    "LEAST_SQUARES_TABLE",
    "METHODS",
    "MINIMIZE_TABLE",
    "Method",
    "budget_key",
    "check_option",
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


MINIMIZE_TABLE: tuple[Method, ...] = (
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
METHODS: tuple[str, ...] = tuple(m.name for m in MINIMIZE_TABLE)  # names, as scipy spells them

_LSQ = "ftol xtol gtol x_scale max_nfev"
LEAST_SQUARES_TABLE: tuple[Method, ...] = (
    Method("lm", True, None, False, frozenset(_LSQ.split()), least_squares=True),
    Method("trf", True, None, True, frozenset(f"{_LSQ} loss f_scale tr_solver tr_options".split()), True),
    Method("dogbox", True, None, True, frozenset(f"{_LSQ} loss f_scale tr_solver tr_options".split()), True),
)
# Options of least_squares that only serve finite differences: refused, the Jacobian is exact.
FINITE_DIFFERENCE_OPTIONS = frozenset({"diff_step", "jac_sparsity"})
LEAST_SQUARES_METHODS: tuple[str, ...] = tuple(m.name for m in LEAST_SQUARES_TABLE)
ALL_METHOD_NAMES: tuple[str, ...] = METHODS + LEAST_SQUARES_METHODS
_BY_KEY = {m.name.lower(): m for m in MINIMIZE_TABLE + LEAST_SQUARES_TABLE}

# keras-opt spelled the iteration limit `maxiter` for every method; TNC calls it `maxfun`.
_MAXITER_ALIAS = {"TNC": "maxfun", "lm": "max_nfev", "trf": "max_nfev", "dogbox": "max_nfev"}


def resolve_method(method: str) -> Method:
    """Look a method up case-insensitively; unknown names list the valid ones."""
    found = _BY_KEY.get(str(method).lower()) if isinstance(method, str) else None
    if found is None:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(ALL_METHOD_NAMES)}")
    return found


def budget_key(method: Method) -> str:
    """The option that holds ``maxiter`` for ``method``."""
    return _MAXITER_ALIAS.get(method.name, "maxiter")


def solver_options(method: Method, maxiter: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options scipy gets, each checked (:func:`check_option`). Unused ones are dropped with a
    warning naming the valid ones."""
    options = dict(options)
    exact = sorted(FINITE_DIFFERENCE_OPTIONS & set(options)) if method.least_squares else []
    if exact:
        raise ValueError(
            f"Option(s) {exact} configure finite differences; the Jacobian here is exact (autodiff). Remove them."
        )
    if maxiter is not None:
        options[budget_key(method)] = check_option("maxiter", maxiter, method)
    unused = sorted(set(options) - method.options)
    if unused:
        warnings.warn(
            f"Option(s) {unused} are not used by method {method.name!r} and were ignored; "
            f"it uses: {sorted(method.options)}",
            UserWarning,
            stacklevel=4,  # the caller of make_train_function
        )
    used = {k: check_option(k, v, method) for k, v in options.items() if k in method.options}
    radius, largest = used.get("initial_trust_radius", 1.0), used.get("max_trust_radius", 1000.0)
    if method.name in _TRUST_METHODS and radius >= largest:
        raise ValueError(
            f"initial_trust_radius={radius!r} must be smaller than max_trust_radius={largest!r} "
            f"(method {method.name!r}); lower the first or raise the second."
        )
    c1, c2 = used.get("c1", 1e-4), used.get("c2", 0.4 if method.name == "CG" else 0.9)
    if c1 >= c2:
        raise ValueError(
            f"The line-search constants need 0 < c1 < c2 < 1 (method {method.name!r}); got c1={c1}, c2={c2}"
        )
    return used


# --------------------------------------------------------------------------- option values
# What a numeric or flag option must be, for every option in the table that has such a rule;
# the others (arrays, callables, dicts) go to scipy as given. Checked before any work, so that a
# bad value never reaches scipy after the data has been loaded.
_COUNTS = "maxiter maxfun maxfev max_nfev maxcor maxls subproblem_maxiter"
_TOLERANCES = "tol gtol ftol xtol xatol fatol xrtol barrier_tol catol feasibility_tol accuracy stepmx"
_POSITIVE = (
    "eps rhobeg f_scale initial_trust_radius max_trust_radius initial_tr_radius final_tr_radius "
    "initial_constr_penalty initial_barrier_parameter initial_barrier_tolerance"
)
_RULES: dict[str, str] = {
    **dict.fromkeys(_COUNTS.split(), "count"),
    **dict.fromkeys(_TOLERANCES.split(), "tolerance"),
    **dict.fromkeys(_POSITIVE.split(), "positive"),
    **dict.fromkeys("c1 c2".split(), "unit"),
    **dict.fromkeys("maxCGit mesg_num iprint".split(), "integer"),
    **dict.fromkeys("norm rescale offset minfev f_target".split(), "real"),
    **dict.fromkeys("disp return_all adaptive inexact".split(), "flag"),
    "verbose": "level",
}
_TRUST_METHODS = frozenset({"dogleg", "trust-ncg", "trust-exact", "trust-krylov"})
_CHOICES = {
    "loss": ("linear", "soft_l1", "huber", "cauchy", "arctan"),
    "tr_solver": (None, "exact", "lsmr"),
    "factorization_method": (None, "NormalEquation", "AugmentedSystem", "QRFactorization", "SVDFactorization"),
}
_WHAT = {
    "count": "a positive integer",
    "integer": "an integer",
    "level": "an integer >= 0",
    "tolerance": "a number >= 0",
    "positive": "a number > 0",
    "unit": "a number strictly between 0 and 1",
    "real": "a real number (not NaN)",
    "flag": "True or False",
}


def check_option(name: str, value: Any, method: Method | None = None) -> Any:
    """``value`` if it is valid for option ``name``, else a TypeError/ValueError naming the option,
    what it must be and what was given. Integral floats (``1e3``) become ints for count options."""
    where = f" (method {method.name!r})" if method is not None else ""
    if name == "eta" and method is not None and method.name in _TRUST_METHODS:
        rule, what = "eta", "a number in [0, 0.25)"
    elif name == "scale" and method is not None and method.name == "COBYQA":
        rule, what = "flag", _WHAT["flag"]
    else:
        rule = _RULES.get(name)
        what = _WHAT.get(rule, "")
    if name in _CHOICES:
        if not (value in _CHOICES[name] or (name == "loss" and callable(value))):
            raise ValueError(f"{name}={value!r}{where} is not one of {list(_CHOICES[name])}")
        return value
    if rule is None:
        return value
    if rule == "flag":
        if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))):
            raise TypeError(f"{name} must be {what}{where}, got {value!r}")
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}{where}, got {value!r} of type {type(value).__name__}")
    if rule in ("count", "integer", "level"):
        least = {"count": 1, "level": 0, "integer": None}[rule]
        try:
            return check_whole(name, value, least)
        except ValueError as exc:
            raise ValueError(f"{exc}{where}") from None
    value = float(value)
    ok = {
        "tolerance": value >= 0,
        "positive": value > 0,
        "unit": 0 < value < 1,
        "eta": 0 <= value < 0.25,
        "real": not math.isnan(value),
    }[rule]
    if not ok or (rule != "real" and not math.isfinite(value)):
        raise ValueError(f"{name} must be {what}{where}, got {value!r}")
    return value


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
            if not (pair is None or _is_pair(pair)):
                raise ValueError(f"bounds[{key!r}] must be a (lo, hi) tuple or None, got {pair!r}")
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
        for side, value, target in zip(("lo", "hi"), pair, (lower, upper), strict=True):
            if value is not None:
                target[flat.slice(i)] = _bound_values(value, flat, i, side)
    for i in nonneg_variables(flat):
        lower[flat.slice(i)] = np.maximum(lower[flat.slice(i)], 0.0)
    crossed = [flat.names[i] for i in range(len(flat)) if np.any(lower[flat.slice(i)] > upper[flat.slice(i)])]
    if crossed:
        raise ValueError(f"bounds have lo > hi for weights of {crossed} (NonNeg adds lo = 0); swap or widen them")
    if np.all(np.isneginf(lower)) and np.all(np.isposinf(upper)):
        return None
    return scipy.optimize.Bounds(lower, upper)


def _bound_values(value: Any, flat: FlatVariables, i: int, side: str) -> np.ndarray:
    """One side of a variable's bounds as a flat float64 array of the variable's size."""
    name, shape = flat.names[i], flat.shapes[i]
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"bounds for {name}: {side} must be a number or an array of numbers, got {value!r}") from None
    if np.any(np.isnan(values)):
        raise ValueError(f"bounds for {name}: {side} contains NaN; use None (or +-inf) for no bound")
    try:
        return np.broadcast_to(values, shape).ravel()
    except ValueError:
        raise ValueError(
            f"bounds for {name}: {side} has shape {values.shape}, which does not broadcast to the variable's "
            f"shape {shape}; pass a scalar or an array of shape {shape}"
        ) from None


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
