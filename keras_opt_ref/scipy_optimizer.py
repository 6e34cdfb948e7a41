"""``make_train_function``: one full-batch ``scipy.optimize.minimize`` run per ``fit`` epoch.

Usage, as with keras-opt::

    from keras_opt_ref import scipy_optimizer
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=20)
    history = model.fit(X, y)

Data path: Keras's ``fit`` calls the train function once per step. On TensorFlow (Keras 3 and
tf-keras) it passes an iterator spanning the epoch: the first call of an epoch drains it into
memory (whatever ``batch_size`` or data source ``fit`` was given), runs one optimization over the
full data set and returns the logs; later calls in the same epoch return those logs without work.
On JAX, ``fit`` passes ``(state, iterator)`` and expects ``(logs, state)``: the same, with the
model's weights taken from ``state`` and the optimized ones returned in it. On torch, ``fit``
passes one batch per call: the batches are collected until the epoch's last one, which runs the
optimization. The objective comes from the model's backend (``core.objective_class``).

Failure path: a NaN/Inf value, gradient, Hessian or residual is never handed to scipy. The
evaluation that produced it stops the run (``_NonFinite``), which ends like any other failure:
the model is left at the best finite point evaluated and ``result.message`` says why.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
import weakref
from collections import Counter
from typing import Any

import numpy as np
import scipy.optimize
import scipy.sparse.linalg
import tensorflow as tf

from . import _keras, checks, core, methods
from .distributed import strategy_of
from .flat import FlatVariables
from .least_squares import DEFAULT_MAX_JACOBIAN_BYTES, LeastSquaresObjective
from .objective import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_HESSIAN_PARAMS,
    FullBatchObjective,
    check_hessian_size,
)
from .trust_ncg import SUBPROBLEMS, in_graph_trust_ncg

__all__ = ["HESSIANS", "LEAST_SQUARES_METHODS", "METHODS", "ScipyTrainFunction", "make_train_function"]

METHODS = methods.METHOD_NAMES  # scipy.optimize.minimize
LEAST_SQUARES_METHODS = tuple(m.name for m in methods.LEAST_SQUARES_METHODS)  # scipy.optimize.least_squares
HESSIANS = ("exact", "gauss-newton")  # what hess/hessp compute for the minimize methods
COUNTS = ("nit", "nfev", "njev", "nhev")  # per-epoch counts in the logs and history


def _held_weakly(source: Any) -> Any:
    """A callable returning ``source`` while something else keeps it alive, then ``None``.

    fit's epoch iterator owns tf.data's threads and buffers. Held strongly here it lived as long as
    the model (six threads per model), and the garbage collection that finally freed such iterators
    blocked in their destructors, waiting for tf.data's threads: 13 s (Keras 3) and 32 s (tf-keras)
    after 30 fits in one process, 40 s inside one unit test. Only identity is needed here, so fit
    alone owns it. Objects without weak references (plain Python iterators) own no TensorFlow
    resources and are held as they are."""
    if source is None:
        return lambda: None
    try:
        return weakref.ref(source)
    except TypeError:
        return lambda: source


class _NonFinite(Exception):
    """An evaluation returned NaN/Inf: raised past scipy to stop the run (never handed to it)."""


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

    objective_class: type | None = None  # what the first call builds (None: the backend's); subclasses may swap it

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
        max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
        subproblem: str = "scipy",
        **options: Any,
    ) -> None:
        # Every argument is checked here, before fit drains any data (methods.check_settings,
        # methods.solver_options, methods.scipy_bounds).
        settings = methods.check_settings(
            verbose=verbose, tol=tol, deterministic=deterministic, chunk_size=chunk_size, jit_compile=jit_compile,
            hvp_mode=hvp_mode, max_hessian_params=max_hessian_params, max_jacobian_bytes=max_jacobian_bytes,
            max_data_bytes=max_data_bytes,
        )
        checks.check_model(model, deterministic=deterministic)
        self.model = model
        self.backend = core.backend_of(model)
        self.method = methods.resolve_method(method)
        self.hessian = _check_hessian_choice(self.method, hessian)
        self.subproblem = _check_subproblem_choice(self.method, self.hessian, subproblem)
        self.jacobian = _check_jacobian_choice(self.method, jacobian, options)
        _check_backend_choice(self.backend, self.method, self.hessian, self.subproblem)
        self.options = methods.solver_options(self.method, maxiter, options)
        if bounds is not None and not self.method.bounds:
            raise ValueError(
                f"Method {self.method.name!r} ignores bounds; use one that honours them: "
                f"{[m.name for m in methods.METHODS + methods.LEAST_SQUARES_METHODS if m.bounds]}"
            )
        self.bounds = bounds
        self.tol = settings["tol"]
        self.verbose = settings["verbose"]
        self.max_data_bytes = settings["max_data_bytes"]
        self._least_squares = self.method.least_squares or self.hessian == "gauss-newton"
        self._objective_kwargs: dict[str, Any] = dict(
            chunk_size=chunk_size,
            jit_compile=jit_compile,
            hvp_mode=hvp_mode,
            max_hessian_params=max_hessian_params,
            deterministic=deterministic,
            max_data_bytes=max_data_bytes,
        )
        if self._least_squares:
            self._objective_kwargs["max_jacobian_bytes"] = max_jacobian_bytes
        self.objective: FullBatchObjective | None = None
        self.result: scipy.optimize.OptimizeResult | None = None
        self.results: list[scipy.optimize.OptimizeResult] = []
        self._source = _held_weakly(None)  # what fit is iterating this epoch (its iterator; torch: its History)
        self._calls_left = 0
        self._logs: dict[str, Any] = {}
        if model.built:
            self._check_distribution()
            checks.check_trainable(model)
            flat = FlatVariables.from_variables(model.trainable_variables)
            if self.method.bounds:
                methods.scipy_bounds(bounds, flat)
            if self.method.uses_dense_hessian:
                check_hessian_size(flat.size, max_hessian_params)
        _keras.on_compile(model, _warn_if_reset)

    # ------------------------------------------------------------- Keras side
    def __call__(self, *args: Any) -> Any:
        caller = _keras.calling_model()
        if caller is not None and caller is not self.model:
            raise ValueError(
                f"This train function was made for model {self.model.name!r} and would train it, but "
                f"{caller.name!r}.fit called it. Make one per model: "
                f"{caller.name}.train_function = make_train_function({caller.name}, ...)."
            )
        if self.backend == "jax":  # fit(...): logs, state = train_function(state, iterator)
            state, iterator = args
            _keras.restore_jax_state(self.model, state)
            return self._epoch(iterator), _keras.jax_state(self.model, state)
        if self.backend == "torch":  # fit(...): logs = train_function([batch])
            return self._collect(*args)
        return self._epoch(*args)

    def _collect(self, data: list[Any]) -> dict[str, Any]:
        """torch: ``fit`` hands one batch per call; the epoch's last one runs the optimization."""
        steps = _keras.fit_steps_per_epoch(self.model)
        if steps is None:
            raise ValueError(
                "On the torch backend fit hands the train function one batch at a time, and this data source does "
                "not say how many batches an epoch has, so the full training set is never known. Pass "
                "steps_per_epoch=... (that many batches form each epoch's training set), or arrays / a dataset of "
                "known length."
            )
        history = getattr(self.model, "history", None)
        if self._source() is not history:  # a new fit: start collecting afresh
            self._source, self._batches = _held_weakly(history), []
        self._batches.extend(data)
        if len(self._batches) < steps:
            return self._logs
        batches, self._batches = self._batches, []
        return self._optimize(_keras.numpy_batches(batches))

    def _epoch(self, iterator: Any) -> dict[str, Any]:
        steps = _keras.fit_steps_per_epoch(self.model)
        first = []
        if iterator is self._source():
            if self._calls_left > 0:
                # Same epoch: Keras calls once per step; the work is done.
                self._calls_left -= 1
                return self._logs
            if steps is None:
                # Data of unknown size was drained: this raises StopIteration, which ends
                # Keras's epoch as its own step would.
                first = [next(iterator)]
        if steps is None and _keras.is_infinite(iterator):
            raise ValueError(
                "fit got an endless tf.data.Dataset (.repeat() without a count) and no steps_per_epoch, so an "
                "epoch's training set would never end. Pass steps_per_epoch=... (that many batches form each "
                "epoch's training set), or repeat the dataset a finite number of times."
            )
        strategy = strategy_of(self.model) if self.backend == "tensorflow" else None
        batches = first + _take(iterator, None if steps is None else steps - len(first), self.max_data_bytes, strategy)
        self._source = _held_weakly(iterator)
        self._calls_left = math.ceil(steps / _keras.steps_per_execution(self.model)) - 1 if steps else 0
        return self._optimize(batches if self.backend == "tensorflow" else _keras.numpy_batches(batches))

    def _optimize(self, batches: list[Any]) -> dict[str, Any]:
        data = _concatenate([_keras.unpack_x_y_sample_weight(self.model, b) for b in batches])
        self._logs = self.run(*data)
        _keras.keep_counts_integer(self.model, self._logs, COUNTS)
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
            kwargs["method"] = in_graph_trust_ncg(objective, calls, _NonFinite)
        if self.method.least_squares:
            kwargs = self._least_squares_kwargs(objective, bounds, calls, progress)
        elif self.hessian == "gauss-newton":
            if "hessp" in kwargs:
                kwargs["hessp"] = _counted(objective.gauss_newton_hessp, calls, "hev", "Gauss-Newton product")
            if "hess" in kwargs:
                kwargs["hess"] = _counted(objective.gauss_newton_hessian, calls, "hev", "Gauss-Newton matrix")
        progress.start(x0)
        try:
            if self.method.least_squares:
                result = _least_squares_result(scipy.optimize.least_squares(x0=x0, **kwargs), calls, progress)
            else:
                result = scipy.optimize.minimize(x0=x0, **kwargs)
        except _NonFinite as stop:  # a controlled stop: the run ends, fit goes on
            logs = self._finish(objective, self._failed_result(x0, stop, calls, progress), x0, bounds, calls, progress)
            warnings.warn(self.result.message, RuntimeWarning, stacklevel=2)
            return logs
        except BaseException as exc:  # KeyboardInterrupt included: keep the best point, then re-raise
            self._finish(objective, self._failed_result(x0, exc, calls, progress), x0, bounds, calls, progress)
            raise
        logs = self._finish(objective, result, x0, bounds, calls, progress)
        if self.method.least_squares:
            self._verify_residuals(objective, x0)
        return logs

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
        self, x0: np.ndarray, exc: BaseException, calls: Counter[str], progress: _Progress
    ) -> scipy.optimize.OptimizeResult:
        if isinstance(exc, _NonFinite):
            reason = f"Stopped: {exc}"
        else:
            reason = f"Stopped by {type(exc).__name__}" + (f" ({checks.summary(exc)})" if str(exc) else "")
        nit = progress.iteration or (calls["fun"] if self.method.name == "lm" else 0)
        njev = calls["jev"] if self.method.least_squares else calls["fun"] if self.method.jac else 0
        return scipy.optimize.OptimizeResult(
            x=x0, fun=math.nan, success=False, status=-1, message=reason, nit=nit, njev=njev, failed=True
        )

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
            fun=_counted(objective.residuals, calls, "fun", "residual vector"),
            jac=_counted(jac, calls, "jev", "Jacobian"),
            method=self.method.name, **options,
        )
        if bounds is not None:
            kwargs["bounds"] = (bounds.lb, bounds.ub)
        if self.method.name != "lm":  # MINPACK takes no callback
            kwargs["callback"] = progress
        return kwargs

    def _objective_for(self, x: Any, y: Any, sample_weight: Any) -> FullBatchObjective:
        if self.objective is None:
            self._check_distribution()
            cls = LeastSquaresObjective if self._least_squares else (
                self.objective_class or core.objective_class(self.model))
            self.objective = cls(self.model, x, y, sample_weight, **self._objective_kwargs)
        else:
            self.objective.set_data(x, y, sample_weight)
        return self.objective

    def _check_distribution(self) -> None:
        """Least squares holds one Jacobian of all residuals on one device: not under a strategy."""
        if self._least_squares and self.backend == "tensorflow" and strategy_of(self.model) is not None:
            what = "hessian='gauss-newton'" if self.hessian == "gauss-newton" else f"method={self.method.name!r}"
            raise ValueError(
                f"{what} (least squares) is not available for a model under a tf.distribute strategy: its residuals "
                "and Jacobian are held on one device. Use a minimize method with the exact Hessian (method="
                "'trust-ncg', 'trust-krylov', 'Newton-CG') or L-BFGS-B, whose values, gradients and Hessian-vector "
                "products are summed over the replicas; or build the model outside strategy.scope()."
            )

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
        the method does not use are dropped with a warning. ``subproblem="in-graph"`` (trust-ncg
        only): scipy's CG-Steihaug subproblem solved inside one compiled call per outer
        iteration, with the same steps and counts (``keras_opt_ref.trust_ncg``); the default
        ``"scipy"`` leaves every product to scipy.

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
    """What only the TensorFlow objective computes is refused elsewhere, before any work."""
    if backend == "tensorflow":
        return
    what = ("least squares (method='lm', 'trf', 'dogbox')" if method.least_squares
            else "hessian='gauss-newton'" if hessian == "gauss-newton"
            else "subproblem='in-graph'" if subproblem == "in-graph" else None)
    if what:
        raise ValueError(
            f"{what} is computed by the TensorFlow objective only; this model runs on Keras's {backend!r} backend. "
            "Use a minimize method with the exact Hessian (method='trust-ncg', 'trust-krylov', 'Newton-CG', "
            "'trust-exact') or L-BFGS-B here, or run the model on TensorFlow (KERAS_BACKEND=tensorflow)."
        )


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
                raise _NonFinite(
                    f"the {kind} is not finite ({bad}) at call {calls[name]} of scipy's {_CALLABLE[name]}, at weights "
                    f"with max |x| = "
                    f"{np.max(np.abs(x)) if x.size else 0:.3g}. A NaN/Inf is never handed to scipy. Common causes: "
                    "a step into a region where the model overflows (exp, log or sqrt of 0, division by 0). Bound "
                    "the weights (bounds=...), take smaller first steps (maxls, initial_trust_radius, stepmx), or "
                    "make the model finite there"
                )
        return out

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
    known = objective.known_value(x)
    if known is not None:
        return known
    try:
        return objective.value(x)
    except Exception:  # reporting must not mask the failure being reported
        return math.nan


_BLOCK = 256  # drained batches are joined in blocks of this many: tensors cost ~1.5 KB each beyond their data


def _take(iterator: Any, count: int | None, max_bytes: int, strategy: Any = None) -> list[Any]:
    """Up to ``count`` batches from a Keras data iterator (all that remain if ``None``), joined into
    blocks as they come, refusing to hold more than ``max_bytes`` of data (as dense tensors): an
    endless source must not grow memory without bound. Under a ``tf.distribute`` ``strategy`` a
    batch is one part per local replica: the parts are taken as batches of their own."""
    blocks, batches, held, taken, rows = [], [], 0, 0, 0
    parts: list[Any] = []
    while count is None or taken < count or parts:
        if not parts:
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            taken += 1
            parts = list(strategy.experimental_local_results(batch)) if strategy is not None else [batch]
        batch = parts.pop(0)
        leaves = [leaf for leaf in tf.nest.flatten(batch) if leaf is not None]
        held += sum(checks.dense_bytes(leaf) for leaf in leaves)
        rows += int(leaves[0].shape[0]) if leaves and len(leaves[0].shape) else 0
        if held > max_bytes:
            blocks.clear(), batches.clear()
            ended = "without ending" if count is None else f"of the epoch's {count}"
            checks.check_data_bytes(held, max_bytes, drained=f"in {taken} batches {ended} ({rows} samples)")
        batches.append(batch)
        if len(batches) == _BLOCK:
            blocks.append(_concatenate(batches))
            batches = []
    return blocks + batches


def _concatenate(batches: list[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    if not batches:
        raise ValueError(
            "fit gave no training data for this epoch (the data source yielded no batch); "
            "pass a non-empty training set."
        )
    if len(batches) == 1:
        return batches[0]

    def join(*parts: Any) -> Any:
        if parts[0] is None:
            return None
        if isinstance(parts[0], tf.SparseTensor):
            return tf.sparse.concat(0, list(parts), expand_nonconcat_dims=True)
        return tf.concat(parts, axis=0)

    return tf.nest.map_structure(join, *batches)


def _warn_if_reset(model: Any, before: Any) -> None:
    """``compile()`` resets ``model.train_function``; say so when it held a scipy train function."""
    if isinstance(before, ScipyTrainFunction) and model.train_function is not before:
        optimizer = type(getattr(model, "optimizer", None)).__name__
        warnings.warn(
            f"model.compile() reset model.train_function, which was keras_opt_ref's {before.method.name} train "
            f"function: fit() would now train with the compiled optimizer ({optimizer}). Assign it again after "
            f"compile(): model.train_function = make_train_function(model, method={before.method.name!r}, ...).",
            UserWarning,
            stacklevel=3,
        )
