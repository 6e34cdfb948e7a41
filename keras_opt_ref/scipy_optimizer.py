"""``make_train_function``: one full-batch ``scipy.optimize.minimize`` run per ``fit`` epoch.

Usage, as with keras-opt::

    from keras_opt_ref import scipy_optimizer
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=20)
    history = model.fit(X, y)

Data path: Keras's ``fit`` calls ``train_function(iterator)`` once per step, the iterator
spanning the epoch. The first call of an epoch drains the iterator into memory (whatever
``batch_size`` or data source ``fit`` was given), runs one optimization over the full data
set and returns the logs; later calls in the same epoch return those logs without work.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections import Counter
from typing import Any

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _keras, checks, methods
from .least_squares import DEFAULT_MAX_JACOBIAN_BYTES, LeastSquaresObjective
from .objective import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_HESSIAN_PARAMS,
    FullBatchObjective,
    check_hessian_size,
)

__all__ = ["HESSIANS", "LEAST_SQUARES_METHODS", "METHODS", "ScipyTrainFunction", "make_train_function"]

METHODS = methods.METHOD_NAMES  # scipy.optimize.minimize
LEAST_SQUARES_METHODS = tuple(m.name for m in methods.LEAST_SQUARES_METHODS)  # scipy.optimize.least_squares
HESSIANS = ("exact", "gauss-newton")  # what hess/hessp compute for the minimize methods


class ScipyTrainFunction:
    """A ``model.train_function`` that minimizes the full-batch loss with scipy.

    Attributes
    ----------
    result : scipy.optimize.OptimizeResult or None
        The last run's result (``x``, ``fun``, ``success``, ``message``, counts) and
        ``trace``: rows ``(seconds since the start, loss)``, one per iteration (loss
        ``nan`` where the method reports only ``x`` at a point not evaluated), first the
        start and last the final weights.
    results : list of OptimizeResult
        One per epoch run so far.
    objective : FullBatchObjective or None
        The objective (created on the first call).
    """

    objective_class = FullBatchObjective  # what the first call builds; subclasses may swap it

    def __init__(
        self,
        model: Any,
        method: str = "CG",
        maxiter: int | None = None,
        verbose: int = 0,
        *,
        bounds: Any = None,
        tol: float | None = None,
        deterministic: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        jit_compile: bool | None = None,
        hvp_mode: str | None = None,
        max_hessian_params: int = DEFAULT_MAX_HESSIAN_PARAMS,
        hessian: str = "exact",
        jacobian: str | None = None,
        max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES,
        **options: Any,
    ) -> None:
        checks.check_model(model, deterministic=deterministic)
        self.model = model
        self.method = methods.resolve_method(method)
        self.hessian = _check_hessian_choice(self.method, hessian)
        self.jacobian = _check_jacobian_choice(self.method, jacobian, options)
        self.options = methods.solver_options(self.method, maxiter, options)
        if bounds is not None and not self.method.bounds:
            raise ValueError(
                f"Method {self.method.name!r} ignores bounds; use one that honours them: "
                f"{[m.name for m in methods.METHODS + methods.LEAST_SQUARES_METHODS if m.bounds]}"
            )
        self.bounds = bounds
        self.tol = tol
        self.verbose = int(verbose)
        self._least_squares = self.method.least_squares or self.hessian == "gauss-newton"
        self._objective_kwargs: dict[str, Any] = dict(
            chunk_size=chunk_size,
            jit_compile=jit_compile,
            hvp_mode=hvp_mode,
            max_hessian_params=max_hessian_params,
            deterministic=deterministic,
        )
        if self._least_squares:
            self._objective_kwargs["max_jacobian_bytes"] = max_jacobian_bytes
        self.objective: FullBatchObjective | None = None
        self.result: scipy.optimize.OptimizeResult | None = None
        self.results: list[scipy.optimize.OptimizeResult] = []
        self._iterator: Any = None
        self._calls_left = 0
        self._logs: dict[str, Any] = {}
        if model.built:
            checks.check_trainable(model)
            if self.method.uses_dense_hessian:
                n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
                check_hessian_size(n, max_hessian_params)

    # ------------------------------------------------------------- Keras side
    def __call__(self, iterator: Any) -> dict[str, Any]:
        steps = _keras.fit_steps_per_epoch(self.model)
        first = []
        if iterator is self._iterator:
            if self._calls_left > 0:
                # Same epoch: Keras calls once per step; the work is done.
                self._calls_left -= 1
                return self._logs
            if steps is None:
                # Data of unknown size was drained: this raises StopIteration, which ends
                # Keras's epoch as its own step would.
                first = [next(iterator)]
        batches = first + _take(iterator, None if steps is None else steps - len(first))
        self._iterator = iterator
        self._calls_left = math.ceil(steps / _keras.steps_per_execution(self.model)) - 1 if steps else 0
        data = _concatenate([_keras.unpack_x_y_sample_weight(self.model, b) for b in batches])
        self._logs = self.run(*data)
        return self._logs

    # ------------------------------------------------------------- scipy side
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
        progress = _Progress(self, objective)
        calls: Counter[str] = Counter()  # what scipy really asked for: the counts we report
        kwargs: dict[str, Any] = dict(method=self.method.name, tol=self.tol, callback=progress, options=self.options)
        if self.method.jac:
            kwargs.update(fun=_counted(objective.value_and_grad, calls, "fun"), jac=True)
        else:
            kwargs.update(fun=_counted(objective.value, calls, "fun"))
        if self.method.hess == "hessp":
            kwargs["hessp"] = _counted(objective.hessp, calls, "hev")
        elif self.method.hess == "hess":
            kwargs["hess"] = _counted(objective.hessian, calls, "hev")
        if bounds is not None:
            kwargs["bounds"] = bounds
        if self.method.least_squares:
            kwargs = self._least_squares_kwargs(objective, bounds, calls, progress)
        elif self.hessian == "gauss-newton":
            if "hessp" in kwargs:
                kwargs["hessp"] = _counted(objective.gauss_newton_hessp, calls, "hev")
            if "hess" in kwargs:
                kwargs["hess"] = _counted(objective.gauss_newton_hessian, calls, "hev")
        progress.start(x0)
        try:
            if self.method.least_squares:
                result = _least_squares_result(scipy.optimize.least_squares(x0=x0, **kwargs), calls, progress)
            else:
                result = scipy.optimize.minimize(x0=x0, **kwargs)
        except BaseException as exc:  # KeyboardInterrupt included: keep the best point, then re-raise
            self._finish(objective, _failed_result(x0, exc), x0, bounds, calls, progress)
            raise
        return self._finish(objective, result, x0, bounds, calls, progress)

    def _least_squares_kwargs(
        self, objective: Any, bounds: scipy.optimize.Bounds | None, calls: Counter[str], progress: _Progress
    ) -> dict[str, Any]:
        m, n = objective.num_residuals, objective.size
        if self.method.name == "lm" and m < n:
            raise ValueError(
                f"method='lm' (MINPACK) needs at least as many residuals as weights: {m} residuals < {n} "
                "weights. Use method='trf' or 'dogbox', which handle m < n, or fit more data."
            )
        options = dict(self.options)
        needs_dense = self.method.name == "lm" or options.get("x_scale") == "jac"
        fits = objective.jacobian_bytes() <= objective.max_jacobian_bytes
        mode = self.jacobian or ("dense" if needs_dense or fits else "operator")
        if mode == "dense":
            objective.check_jacobian_size()  # refuses above the limit, naming the matrix-free route
        else:
            options["tr_solver"] = "lsmr"
        self.jacobian_mode = mode
        jac = objective.jacobian if mode == "dense" else objective.jacobian_operator
        kwargs: dict[str, Any] = dict(
            fun=_counted(objective.residuals, calls, "fun"), jac=_counted(jac, calls, "jev"),
            method=self.method.name, **options,
        )
        if bounds is not None:
            kwargs["bounds"] = (bounds.lb, bounds.ub)
        if self.method.name != "lm":  # MINPACK takes no callback
            kwargs["callback"] = progress
        return kwargs

    def _objective_for(self, x: Any, y: Any, sample_weight: Any) -> FullBatchObjective:
        if self.objective is None:
            cls = LeastSquaresObjective if self._least_squares else self.objective_class
            self.objective = cls(self.model, x, y, sample_weight, **self._objective_kwargs)
        else:
            self.objective.set_data(x, y, sample_weight)
        return self.objective

    def _finish(
        self,
        objective: FullBatchObjective,
        result: Any,
        x0: np.ndarray,
        bounds: scipy.optimize.Bounds | None,
        calls: Counter[str],
        progress: _Progress,
    ) -> dict[str, Any]:
        fun = float(result.get("fun", math.nan))
        best_x, best_value = objective.best_x, objective.best_value
        if best_x is not None and bounds is not None and not _inside(best_x, bounds):
            best_x = None  # COBYLA evaluates infeasible points; never keep one
        if not (math.isfinite(fun) and (best_x is None or fun <= best_value)):
            # scipy's point is non-finite or worse than one already seen: keep the best
            # finite point, or the start if no evaluation was finite.
            where = "the best point found" if best_x is not None else "its starting weights"
            result.x = best_x if best_x is not None else x0
            result.message = (
                f"{result.get('message', '')} -- model left at {where} (scipy's returned loss {fun:.6g})"
            ).strip(" -")
        objective.set_weights(_into_bounds(objective.flat, np.asarray(result.x, dtype=np.float64), bounds))
        # Report what the model holds (x rounded to the variables' dtype, inside the bounds)
        # and the loss there; a memo hit unless rounding or projection moved the point.
        result.x = objective.flat.read()
        result.fun = _loss_or_nan(objective, result.x)
        result.nfev = calls["fun"]
        result.nhev = calls["hev"]
        result.njev = int(result.get("njev", calls["fun"] if self.method.jac else 0) or 0)
        result.nit = int(result.get("nit", 0) or 0)
        result.trace = np.array(progress.trace + [(time.perf_counter() - progress.started, float(result.fun))])
        self.result = result
        self.results.append(result)
        progress.stop(result)
        logs: dict[str, Any] = {"loss": float(result.fun)}
        logs.update(self._metrics(objective))
        logs.update({key: result[key] for key in ("nit", "nfev", "njev", "nhev")})
        return logs

    def _metrics(self, objective: FullBatchObjective) -> dict[str, float]:
        config = self.model.get_compile_config() or {}
        if not (config.get("metrics") or config.get("weighted_metrics")):
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
                f"({[m.name for m in methods.METHODS if m.bounds]}); others are not applied.",
                UserWarning,
                stacklevel=3,
            )


def make_train_function(
    model: Any,
    method: str = "CG",
    maxiter: int | None = None,
    verbose: int = 0,
    **options: Any,
) -> ScipyTrainFunction:
    """Make a ``model.train_function`` that runs ``scipy.optimize.minimize`` once per epoch.

    Parameters
    ----------
    model
        A compiled Keras 3 (TensorFlow backend) or tf-keras model.
    method
        Any ``scipy.optimize.minimize`` method, case-insensitive (see ``METHODS``), or
        ``"lm"``, ``"trf"``, ``"dogbox"``: ``scipy.optimize.least_squares`` on residuals whose
        squares sum to Keras's loss (loss ``"mse"``, L2 regularizers only). Default ``"CG"``
        as in keras-opt.
    maxiter
        Iteration limit per epoch (``maxfun`` for TNC); ``None`` keeps scipy's default.
    verbose
        1 prints one line per iteration (loss, gradient norm, evaluations) and the stop
        reason; 0 prints nothing.
    **options
        scipy solver options (``gtol=``, ``maxcor=``, ...), plus ``bounds=`` (one
        ``(lo, hi)`` pair, a dict per variable name, or a list per variable), ``tol=``,
        and the objective's settings ``deterministic=``, ``chunk_size=``,
        ``jit_compile=``, ``hvp_mode=``, ``max_hessian_params=``. ``hessian="gauss-newton"``
        hands the Hessian-based minimize methods ``2 J^T J`` (products, or the dense matrix
        for trust-exact and dogleg) instead of the exact Hessian. For the least-squares
        methods: ``ftol``, ``xtol``, ``gtol``, ``x_scale``, ``loss``, ``f_scale``,
        ``max_nfev`` (``maxiter`` is an alias), ``tr_solver``, ``tr_options``;
        ``jacobian="dense"`` or ``"operator"`` (matrix-free with ``tr_solver="lsmr"``; the
        default picks it when the dense Jacobian would pass ``max_jacobian_bytes``). Options
        the method does not use are dropped with a warning.

    Returns
    -------
    ScipyTrainFunction
        Assign it to ``model.train_function`` (after ``compile``). Its ``result`` holds
        the last ``OptimizeResult``.
    """
    return ScipyTrainFunction(model, method, maxiter, verbose, **options)


class _Progress:
    """scipy callback: per-iteration line when verbose, and the stop reason."""

    def __init__(self, owner: ScipyTrainFunction, objective: FullBatchObjective) -> None:
        self.owner, self.objective = owner, objective
        self.iteration = 0
        self.started = 0.0
        self.trace: list[tuple[float, float]] = [(0.0, math.nan)]

    def start(self, x0: np.ndarray) -> None:
        self.started = time.perf_counter()
        cached = self.objective.cached(x0)
        self.trace = [(0.0, cached[0] if cached is not None else math.nan)]
        if self.owner.verbose:
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
        verbose = self.owner.verbose
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
        if self.owner.verbose:
            _print(
                f"{self.owner.method.name} stopped: {result.get('message', '')} "
                f"(loss {float(result.fun):.8g}, nit={result['nit']}, nfev={result['nfev']}, "
                f"njev={result['njev']}, nhev={result['nhev']}, {time.perf_counter() - self.started:.3f} s)"
            )


def _print(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _failed_result(x0: np.ndarray, exc: BaseException) -> scipy.optimize.OptimizeResult:
    return scipy.optimize.OptimizeResult(
        x=x0, fun=math.nan, success=False, status=-1, message=f"stopped by {type(exc).__name__}: {exc}"
    )


def _least_squares_result(result: Any, calls: Counter[str], progress: _Progress) -> Any:
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
        users = [m.name for m in methods.METHODS if m.hess]
        raise ValueError(
            f"hessian='gauss-newton' changes the Hessian a method is handed, and {method.name!r} takes none; "
            f"use one of {users}, or method='lm'/'trf'/'dogbox' (least squares)."
        )
    return hessian


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


def _counted(fn: Any, calls: Counter[str], name: str) -> Any:
    def counted(*args: Any) -> Any:
        calls[name] += 1
        return fn(*args)

    return counted


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
        rounded = x[where].astype(dtype.as_numpy_dtype)
        wide = rounded.astype(np.float64)
        rounded = np.where(wide > hi, np.nextafter(rounded, rounded.dtype.type(-np.inf)), rounded)
        rounded = np.where(wide < lo, np.nextafter(rounded, rounded.dtype.type(np.inf)), rounded)
        x[where] = rounded
    return x


def _loss_or_nan(objective: FullBatchObjective, x: np.ndarray) -> float:
    cached = objective.cached(x)
    if cached is not None:
        return cached[0]
    try:
        return objective.value(x)
    except Exception:  # reporting must not mask the failure being reported
        return math.nan


def _take(iterator: Any, count: int | None) -> list[Any]:
    """Up to ``count`` batches from a Keras data iterator (all that remain if ``None``)."""
    batches = []
    while count is None or len(batches) < count:
        try:
            batches.append(next(iterator))
        except (StopIteration, tf.errors.OutOfRangeError):
            break
    return batches


def _concatenate(batches: list[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    if not batches:
        raise ValueError(
            "fit gave no training data for this epoch (the data source yielded no batch); "
            "pass a non-empty training set."
        )
    if len(batches) == 1:
        return batches[0]
    return tf.nest.map_structure(lambda *parts: None if parts[0] is None else tf.concat(parts, axis=0), *batches)

