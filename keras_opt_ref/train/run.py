"""One scipy run over an objective: what scipy is handed, how the run ends, what the model keeps.

Failure path: a NaN/Inf value, gradient, Hessian or residual is never handed to scipy. The
evaluation that produced it stops the run (``NonFinite``), which ends like any other failure:
the model is left at the best finite point evaluated and ``result.message`` says why.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from typing import Any

import numpy as np
import scipy.optimize
import scipy.sparse.linalg

from .. import backends
from ..base import checks, keras_compat
from ..base.objective import Objective
from . import methods, threads
from .events import Events, StopRequested
from .progress import Progress
from .trust_ncg import SUBPROBLEMS, in_graph_trust_ncg

__all__ = ["HESSIANS", "LEAST_SQUARES_METHODS", "METHODS", "NonFinite", "ScipyRun", "check_choices"]

METHODS = methods.METHODS  # scipy.optimize.minimize
LEAST_SQUARES_METHODS = methods.LEAST_SQUARES_METHODS  # scipy.optimize.least_squares
HESSIANS = ("exact", "gauss-newton")  # what hess/hessp compute for the minimize methods


class NonFinite(Exception):
    """An evaluation returned NaN/Inf: raised past scipy to stop the run (never handed to it)."""


class ScipyRun:
    """The scipy side of the train function: one ``minimize`` or ``least_squares`` run per call of
    :meth:`run`. Reads the configuration the train function checked: ``model``, ``method`` (a
    ``methods.Method``), ``options``, ``bounds``, ``tol``, ``verbose``, ``hessian``, ``subproblem``,
    ``jacobian``, ``blas_threads``, and gets its objective from ``_objective_for``."""

    objective: Any = None
    blas_threads: int | str | None = threads.AUTO  # scipy's BLAS threads during a run (threads.blas_limit)
    result: scipy.optimize.OptimizeResult | None = None
    callbacks: list[Any] = []  # Keras callbacks that see each iteration as an epoch (events.Events)
    iterations_done = 0  # iterations of all runs so far (the callbacks' epoch numbers)
    resumed_counts = dict.fromkeys(("nit", "nfev", "njev", "nhev"), 0)  # of the run this one resumes
    fit_verbosity = 0  # the calling fit's verbose: 1 shows a live progress line

    def open_training(self, callbacks: list[Any]) -> bool:
        """Whether the callbacks' ``on_train_begin`` is due now (here: every run is a training)."""
        return True

    def close_training_after_run(self) -> bool:
        """Whether the callbacks' ``on_train_end`` is due when a run ends (here: always)."""
        return True

    @property
    def iteration_budget(self) -> int | None:
        """The run's iteration limit as scipy is handed it (None: scipy's default)."""
        value = self._run_options().get(methods.budget_key(self.method))
        return int(value) if isinstance(value, (int, np.integer)) else None

    def _run_options(self) -> dict[str, Any]:
        """scipy's options for this run: a resumed run has the budget its checkpoint left."""
        options = dict(self.options)
        key = methods.budget_key(self.method)
        if self.resumed_counts["nit"] and isinstance(options.get(key), (int, np.integer)):
            done = self.resumed_counts["nfev" if key in ("maxfun", "max_nfev") else "nit"]
            options[key] = int(options[key]) - done  # > 0: checked when the train function was made
        return options

    def _objective_for(self, x: Any, y: Any, sample_weight: Any) -> Objective:
        raise NotImplementedError

    def run(self, x: Any, y: Any = None, sample_weight: Any = None) -> dict[str, Any]:
        """One optimization over ``(x, y, sample_weight)``; returns the epoch's logs."""
        objective = self._objective_for(x, y, sample_weight)
        if self.method.uses_dense_hessian:
            objective.check_hessian_size()
        flat = objective.flat
        self._warn_unenforced_constraints(flat)
        bounds = methods.scipy_bounds(self.bounds, flat) if self.method.bounds else None
        x0 = flat.read()
        if bounds is not None:
            clipped = np.clip(x0, bounds.lb, bounds.ub)
            if not np.array_equal(clipped, x0):
                warnings.warn("Initial weights outside the bounds were clipped into them.", UserWarning, stacklevel=2)
            x0 = clipped
        objective.reset_counters()
        objective.best_x, objective.best_value = None, math.inf
        calls: Counter[str] = Counter()  # what scipy really asked for: the counts we report
        progress = Progress(self, objective, Events(self, objective, calls, self._njev, self.fit_verbosity))
        kwargs: dict[str, Any] = dict(method=self.method.name, tol=self.tol, callback=progress,
                                      options=self._run_options())
        if self.method.jac:
            kwargs.update(fun=_counted(objective.value_and_grad, calls, "fun", "loss", "gradient"), jac=True)
        else:
            kwargs.update(fun=_counted(objective.value, calls, "fun", "loss"))
        if self.method.hess == "hessp":
            kwargs["hessp"] = _counted(objective.hessp, calls, "hev", "Hessian-vector product")
        elif self.method.hess == "hess":
            kwargs["hess"] = _counted(objective.hessian, calls, "hev", "Hessian")
        if bounds is not None:
            kwargs["bounds"] = bounds
        if self.subproblem == "in-graph":
            kwargs["method"] = in_graph_trust_ncg(objective, calls, NonFinite)
        if self.method.least_squares:
            kwargs = self._least_squares_kwargs(objective, bounds, calls, progress)
        elif self.hessian == "gauss-newton":
            if "hessp" in kwargs:
                kwargs["hessp"] = _counted(objective.gauss_newton_hessp, calls, "hev", "Gauss-Newton product")
            if "hess" in kwargs:
                kwargs["hess"] = _counted(objective.gauss_newton_hessian, calls, "hev", "Gauss-Newton matrix")
        if self.resumed_counts["nit"]:
            self._check_resumed_loss(objective, x0)
        progress.start(x0)
        try:
            with threads.blas_limit(self.method.name, self.blas_threads):
                if self.method.least_squares:
                    result = _least_squares_result(scipy.optimize.least_squares(x0=x0, **kwargs), calls, progress)
                else:
                    result = scipy.optimize.minimize(x0=x0, **kwargs)
        except NonFinite as stop:  # a controlled stop: the run ends, fit goes on
            if progress.events is not None:
                progress.events.non_finite(progress.iteration + 1, math.nan)
            logs = self._finish(objective, self._failed_result(x0, stop, calls, progress), x0, bounds, calls, progress)
            warnings.warn(self.result.message, RuntimeWarning, stacklevel=2)
            return logs
        except StopRequested as stop:  # a callback set model.stop_training: the user's wish, no warning
            return self._finish(objective, self._failed_result(x0, stop, calls, progress), x0, bounds, calls, progress)
        except BaseException as exc:  # KeyboardInterrupt included: keep the best point, then re-raise
            self._finish(objective, self._failed_result(x0, exc, calls, progress), x0, bounds, calls, progress)
            raise
        logs = self._finish(objective, result, x0, bounds, calls, progress)
        if self.method.least_squares:
            self._verify_residuals(objective, x0)
        return logs

    def _check_resumed_loss(self, objective: Objective, x0: np.ndarray) -> None:
        """A resumed run starts where its checkpoint's loss says: else the data, loss or model differ."""
        saved = float(getattr(self, "resumed_state", {}).get("loss", math.nan))
        here = objective.value(x0)
        if math.isfinite(saved) and not abs(here - saved) <= 1e-4 * abs(saved) + 1e-12:
            warnings.warn(
                f"resume_from: the loss at the checkpoint's weights is {here:.8g} here, but {saved:.8g} when it was "
                "written: the data, the loss or the model differ from the run being resumed. Resuming anyway.",
                UserWarning, stacklevel=3,
            )

    def _verify_residuals(self, objective: Any, x0: np.ndarray) -> None:
        """Least squares trusts r . r to be Keras's loss: checked at the start (on construction)
        and here at the end, where a term the residuals miss has had the whole run to grow."""
        try:
            objective.check_consistent(self.result.x, when="at the end of the run")
        except checks.NotSquaredErrorError:
            objective.set_weights(x0)  # the last point where r . r was Keras's loss
            self.result.x, self.result.success = objective.flat.read(), False
            raise

    def _failed_result(
        self, x0: np.ndarray, exc: BaseException, calls: Counter[str], progress: Progress
    ) -> scipy.optimize.OptimizeResult:
        status = -1
        if isinstance(exc, NonFinite):
            reason = f"Stopped: {exc}"
        elif isinstance(exc, StopRequested):
            reason = (f"Stopped by callback {exc} (it set model.stop_training) at the end of iteration "
                      f"{progress.iteration}")
            status = 99  # scipy's status for a callback that stops the run
        else:
            reason = f"Stopped by {type(exc).__name__}" + (f" ({checks.summary(exc)})" if str(exc) else "")
        nit = progress.iteration or (calls["fun"] if self.method.name == "lm" else 0)
        return scipy.optimize.OptimizeResult(
            x=x0, fun=math.nan, success=False, status=status, message=reason, nit=nit, njev=self._njev(calls),
            failed=True,
        )

    def _njev(self, calls: Counter[str]) -> int:
        """Gradient (or Jacobian) evaluations so far: the minimize methods' come with each value."""
        return calls["jev"] if self.method.least_squares else calls["fun"] if self.method.jac else 0

    def _least_squares_kwargs(
        self, objective: Any, bounds: scipy.optimize.Bounds | None, calls: Counter[str], progress: Progress
    ) -> dict[str, Any]:
        m, n = objective.num_residuals, objective.size
        if self.method.name == "lm" and m < n:
            raise ValueError(
                f"method='lm' (MINPACK) needs at least as many residuals as weights: {m} residuals < {n} "
                "weights. Use method='trf' or 'dogbox', which handle m < n, or fit more data."
            )
        options = self._run_options()
        needs_dense = self.method.name == "lm" or options.get("x_scale") == "jac"
        fits = objective.jacobian_bytes() <= objective.max_jacobian_bytes
        mode = self.jacobian or ("dense" if needs_dense or fits else "operator")
        if mode == "dense":
            objective.check_jacobian_size()  # refuses above the limit, naming the matrix-free route
        else:
            options["tr_solver"] = "lsmr"
        self.jacobian_mode = mode
        jac = objective.jacobian if mode == "dense" else objective.jacobian_operator
        fun = _counted(objective.residuals, calls, "fun", "residual vector")
        if self.method.name == "lm":  # MINPACK takes no callback: each evaluation is its iteration
            fun = _each_evaluation(fun, progress)
        kwargs: dict[str, Any] = dict(
            fun=fun,
            jac=_counted(jac, calls, "jev", "Jacobian"),
            method=self.method.name, **options,
        )
        if bounds is not None:
            kwargs["bounds"] = (bounds.lb, bounds.ub)
        if self.method.name != "lm":  # MINPACK takes no callback
            kwargs["callback"] = progress
        return kwargs

    def _finish(
        self,
        objective: Objective,
        result: Any,
        x0: np.ndarray,
        bounds: scipy.optimize.Bounds | None,
        calls: Counter[str],
        progress: Progress,
    ) -> dict[str, Any]:
        fun = float(result.get("fun", math.nan))
        best_x, best_value = objective.best_x, objective.best_value
        if best_x is not None and bounds is not None and not _inside(best_x, bounds):
            best_x = None  # COBYLA evaluates infeasible points; never keep one
        failed = bool(result.pop("failed", False))
        moved = not (math.isfinite(fun) and (best_x is None or fun <= best_value))
        if moved:
            # scipy's point is non-finite or worse than one already seen (or the run failed):
            # keep the best finite point, or the start if no evaluation was finite.
            result.x = best_x if best_x is not None else x0
        objective.set_weights(_into_bounds(objective.flat, np.asarray(result.x, dtype=np.float64), bounds))
        # Report what the model holds (x rounded to the variables' dtype, inside the bounds)
        # and the loss there; a memo hit unless rounding or projection moved the point.
        result.x = objective.flat.read()
        result.fun = _loss_or_nan(objective, result.x)
        if moved:
            where = "the best finite point evaluated" if best_x is not None else "its starting weights"
            returned = "" if failed else f"; scipy's returned loss: {fun:.6g}"
            result.message = f"{result.get('message', '')} -- model left at {where}, loss {result.fun:.6g}{returned}"
        result.nfev = calls["fun"]
        result.nhev = calls["hev"]
        result.njev = int(result.get("njev", calls["fun"] if self.method.jac else 0) or 0)
        result.nit = int(result.get("nit", 0) or 0)
        if self.resumed_counts["nit"]:  # the counts go on from the checkpoint's (once)
            result.resumed_from = dict(self.resumed_counts)
            for key, done in self.resumed_counts.items():
                result[key] += done
            self.resumed_counts = dict.fromkeys(self.resumed_counts, 0)
        result.trace = np.array(progress.trace + [(time.perf_counter() - progress.started, float(result.fun))])
        result.started = progress.started  # time.perf_counter() when the scipy run began: the trace's zero
        self.result = result
        self.results.append(result)
        progress.stop(result)
        logs: dict[str, Any] = {"loss": float(result.fun)}
        logs.update(self._metrics(objective))
        logs.update({key: result[key] for key in ("nit", "nfev", "njev", "nhev")})
        return logs

    def _metrics(self, objective: Objective) -> dict[str, float]:
        if not keras_compat.has_compiled_metrics(self.model):
            return {}
        x, y, sample_weight = objective.data
        history = getattr(self.model, "history", None)
        try:
            values = self.model.evaluate(
                x, y, sample_weight=sample_weight, batch_size=objective.chunk_size, verbose=0, return_dict=True
            )
        finally:
            # tf-keras's evaluate installs its own History on the model; fit returns model.history.
            self.model.history = history
        return {k: float(v) for k, v in values.items() if k != "loss"}

    def _warn_unenforced_constraints(self, flat: Any) -> None:
        constrained = methods.constrained_variables(flat)
        unenforced = {
            flat.names[i]: name
            for i, name in constrained.items()
            if not (name == "NonNeg" and self.method.bounds)
        }
        if unenforced:
            warnings.warn(
                f"Keras constraints {unenforced} are not enforced by method {self.method.name!r}. "
                "NonNeg becomes a lower bound of 0 with a bounded method "
                f"({[m.name for m in methods.MINIMIZE_TABLE if m.bounds]}); others are not applied.",
                UserWarning,
                stacklevel=3,
            )


def _least_squares_result(result: Any, calls: Counter[str], progress: Progress) -> Any:
    """least_squares reports ``cost = r . r / 2`` and the residuals as ``fun``: restate as minimize does."""
    result.residuals = result.fun
    result.fun = 2.0 * float(result.cost)
    result.nit = progress.iteration or calls["fun"]  # lm reports no iterations: one per evaluation
    result.njev = calls["jev"]
    return result


def _check_hessian_choice(method: methods.Method, hessian: str) -> str:
    if hessian not in HESSIANS:
        raise ValueError(f"Unknown hessian {hessian!r}; choose one of {HESSIANS}")
    if hessian == "gauss-newton" and method.hess is None:
        users = [m.name for m in methods.MINIMIZE_TABLE if m.hess]
        raise ValueError(
            f"hessian='gauss-newton' changes the Hessian a method is handed, and {method.name!r} takes none; "
            f"use one of {users}, or method='lm'/'trf'/'dogbox' (least squares)."
        )
    return hessian


def _check_subproblem_choice(method: methods.Method, hessian: str, subproblem: Any) -> str:
    if subproblem not in SUBPROBLEMS:
        raise ValueError(f"Unknown subproblem {subproblem!r}; choose one of {SUBPROBLEMS}")
    if subproblem == "in-graph" and (method.name != "trust-ncg" or hessian != "exact"):
        raise ValueError(
            f"subproblem='in-graph' solves trust-ncg's CG-Steihaug subproblem with the exact Hessian inside the "
            f"compiled graph; it does not apply to method={method.name!r}"
            + ("" if method.name != "trust-ncg" else f" with hessian={hessian!r}")
            + ". Use method='trust-ncg' (hessian='exact'), or subproblem='scipy'."
        )
    return subproblem


def _check_backend_choice(backend: str, method: methods.Method, hessian: str, subproblem: str) -> None:
    """What only some backends compute is refused elsewhere, before any work."""
    need, what = (("least_squares", "least squares (method='lm', 'trf', 'dogbox')") if method.least_squares
                  else ("gauss_newton", "hessian='gauss-newton'") if hessian == "gauss-newton"
                  else ("in_graph_subproblem", "subproblem='in-graph'") if subproblem == "in-graph" else ("", ""))
    if need and need not in backends.backend(backend).CAPABILITIES:
        raise ValueError(
            f"{what} is computed by the {' and '.join(backends.providing(need))} objective only; this model runs on "
            f"Keras's {backend!r} backend. Use a minimize method with the exact Hessian (method='trust-ncg', "
            "'trust-krylov', 'Newton-CG', 'trust-exact') or L-BFGS-B here, or run the model on a backend that "
            "computes it (KERAS_BACKEND=...)."
        )


def check_choices(backend: str, method: methods.Method, hessian: str, subproblem: Any, jacobian: str | None,
                  options: dict[str, Any]) -> tuple[str, str, str | None]:
    """``hessian=``, ``subproblem=`` and ``jacobian=`` checked against the method and the backend."""
    hessian = _check_hessian_choice(method, hessian)
    subproblem = _check_subproblem_choice(method, hessian, subproblem)
    jacobian = _check_jacobian_choice(method, jacobian, options)
    _check_backend_choice(backend, method, hessian, subproblem)
    return hessian, subproblem, jacobian


def _check_jacobian_choice(method: methods.Method, jacobian: str | None, options: dict[str, Any]) -> str | None:
    if jacobian is None:
        return None
    if not method.least_squares:
        raise ValueError(f"jacobian= is an option of the least-squares methods {LEAST_SQUARES_METHODS}")
    if jacobian not in ("dense", "operator"):
        raise ValueError(f"Unknown jacobian {jacobian!r}; choose 'dense', 'operator' or None (by size)")
    if jacobian == "operator" and (method.name == "lm" or options.get("x_scale") == "jac"):
        raise ValueError(
            "jacobian='operator' (matrix-free, tr_solver='lsmr') works with method='trf' or 'dogbox' and "
            "without x_scale='jac', which needs the Jacobian's columns; use jacobian='dense'."
        )
    if jacobian == "operator" and options.get("tr_solver", "lsmr") != "lsmr":
        raise ValueError("jacobian='operator' needs tr_solver='lsmr' (scipy's 'exact' needs the matrix)")
    return jacobian


_CALLABLE = {"fun": "fun", "hev": "hess/hessp", "jev": "jac"}  # what each count counts, as scipy calls it


def _counted(fn: Any, calls: Counter[str], name: str, *kinds: str) -> Any:
    """``fn`` counted in ``calls[name]``; a non-finite output (named by ``kinds``, in the order
    ``fn`` returns them) stops the run instead of reaching scipy."""

    def counted(*args: Any) -> Any:
        calls[name] += 1
        out = fn(*args)
        for kind, value in zip(kinds, out if isinstance(out, tuple) else (out,), strict=False):
            if isinstance(value, scipy.sparse.linalg.LinearOperator):
                continue
            bad = checks.non_finite(value)
            if bad:
                x = np.asarray(args[0], dtype=np.float64)
                raise NonFinite(
                    f"the {kind} is not finite ({bad}) at call {calls[name]} of scipy's {_CALLABLE[name]}, at weights "
                    f"with max |x| = "
                    f"{np.max(np.abs(x)) if x.size else 0:.3g}. A NaN/Inf is never handed to scipy. Common causes: "
                    "a step into a region where the model overflows (exp, log or sqrt of 0, division by 0). Bound "
                    "the weights (bounds=...), take smaller first steps (maxls, initial_trust_radius, stepmx), or "
                    "make the model finite there"
                )
        return out

    return counted


def _each_evaluation(fun: Any, progress: Progress) -> Any:
    """``fun`` (residuals) that reports each evaluation to ``progress`` as an iteration."""

    def evaluated(x: Any) -> Any:
        r = fun(x)
        progress(scipy.optimize.OptimizeResult(x=np.asarray(x), fun=r, cost=0.5 * float(np.dot(r, r))))
        return r

    return evaluated


def _inside(x: np.ndarray, bounds: scipy.optimize.Bounds) -> bool:
    return bool(np.all(x >= bounds.lb) and np.all(x <= bounds.ub))


def _into_bounds(flat: Any, x: np.ndarray, bounds: scipy.optimize.Bounds | None) -> np.ndarray:
    """Project onto the box, so that rounding to each variable's dtype also stays inside."""
    if bounds is None:
        return x
    x = np.clip(x, bounds.lb, bounds.ub)
    for i, dtype in enumerate(flat.dtypes):
        where = flat.slice(i)
        lo, hi = bounds.lb[where], bounds.ub[where]
        rounded = x[where].astype(dtype)
        wide = rounded.astype(np.float64)
        rounded = np.where(wide > hi, np.nextafter(rounded, rounded.dtype.type(-np.inf)), rounded)
        rounded = np.where(wide < lo, np.nextafter(rounded, rounded.dtype.type(np.inf)), rounded)
        x[where] = rounded
    return x


def _loss_or_nan(objective: Objective, x: np.ndarray) -> float:
    known = objective.known_value(x)
    if known is not None:
        return known
    try:
        return objective.value(x)
    except Exception:  # reporting must not mask the failure being reported
        return math.nan
