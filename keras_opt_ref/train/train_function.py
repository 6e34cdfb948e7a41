"""``make_train_function``: one full-batch scipy run per ``fit`` epoch.

Usage, as with keras-opt::

    from keras_opt_ref import scipy_optimizer
    model.compile(loss="mse")
    model.train_function = scipy_optimizer.make_train_function(model, method="trust-ncg", maxiter=20)
    history = model.fit(X, y)

Data path: Keras's ``fit`` calls the train function once per step, each backend in its own way
(its ``FitProtocol``, ``keras_opt_ref.backends.<name>.fit``). On TensorFlow and JAX it hands an
iterator spanning the epoch: the first call of an epoch drains it into memory (whatever
``batch_size`` or data source ``fit`` was given), runs one optimization over the full data set
(``ScipyRun.run``) and returns the logs; later calls in the same epoch return those logs without
work. On torch, ``fit`` hands one batch per call: the batches are collected until the epoch's last
one, which runs the optimization. The objective comes from the model's backend
(``keras_opt_ref.backends.objective_class``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import weakref
from typing import Any

import scipy.optimize

from .. import backends
from ..base import checks, keras_compat
from ..base.flat import FlatVariables
from ..base.objective import Objective, check_hessian_size
from ..base.settings import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_HESSIAN_PARAMS,
    DEFAULT_MAX_JACOBIAN_BYTES,
    Settings,
)
from . import events, methods, threads
from .run import HESSIANS, LEAST_SQUARES_METHODS, METHODS, ScipyRun, check_choices

__all__ = ["HESSIANS", "LEAST_SQUARES_METHODS", "METHODS", "ScipyTrainFunction", "make_train_function"]

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


class ScipyTrainFunction(ScipyRun):
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
    objective : Objective or None
        The objective (created on the first call).

    Keras's ``fit`` calls it through the backend's ``FitProtocol``, which hands the epoch's data to
    :meth:`epoch` (an iterator over the epoch) or :meth:`optimize` (the epoch's batches).
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
        loss_over_rows: str | None = None,
        subproblem: str = "scipy",
        blas_threads: int | str | None = threads.AUTO,
        callbacks: Any = None,
        resume_from: Any = None,
        **options: Any,
    ) -> None:
        # Every argument is checked here, before fit drains any data (Settings, methods.check_option,
        # methods.solver_options, methods.scipy_bounds).
        self.settings = Settings.checked(
            deterministic=deterministic, chunk_size=chunk_size, jit_compile=jit_compile, hvp_mode=hvp_mode,
            max_hessian_params=max_hessian_params, max_jacobian_bytes=max_jacobian_bytes, max_data_bytes=max_data_bytes,
            loss_over_rows=loss_over_rows,
        )
        self.verbose = methods.check_option("verbose", verbose)
        self.blas_threads = threads.check_blas_threads(blas_threads)
        self.tol = None if tol is None else methods.check_option("tol", tol)
        checks.check_model(model, deterministic=deterministic)
        self.model = model
        self.backend = backends.backend_of(model)
        self.method = methods.resolve_method(method)
        self.hessian, self.subproblem, self.jacobian = check_choices(
            self.backend, self.method, hessian, subproblem, jacobian, options)
        self.options = methods.solver_options(self.method, maxiter, options)
        if bounds is not None and not self.method.bounds:
            raise ValueError(
                f"Method {self.method.name!r} ignores bounds; use one that honours them: "
                f"{[m.name for m in methods.MINIMIZE_TABLE + methods.LEAST_SQUARES_TABLE if m.bounds]}"
            )
        self.bounds = bounds
        self.max_data_bytes = self.settings.max_data_bytes
        # What asks for residuals (least squares, or the Gauss-Newton matrix), named in refusals.
        self._least_squares = (f"method={self.method.name!r}" if self.method.least_squares
                               else "hessian='gauss-newton'" if self.hessian == "gauss-newton" else "")
        self._protocol = backends.fit_protocol(self.backend)
        self.objective: Objective | None = None
        self.result: scipy.optimize.OptimizeResult | None = None
        self.results: list[scipy.optimize.OptimizeResult] = []
        self._source = _held_weakly(None)  # the iterator fit is draining this epoch
        self._calls_left = 0
        self._logs: dict[str, Any] = {}
        if resume_from is not None:
            self._resume(resume_from)
        self.callbacks = self._checked_callbacks(callbacks)
        self._fit_callbacks: Any = None  # the calling fit's CallbackList, during a call
        self._training_for: Any = lambda: None  # the fit whose on_train_end will close the callbacks
        if model.built:
            backends.objective_class(model, self._least_squares)  # refuses what the backend cannot compute
            checks.check_trainable(model)
            flat = FlatVariables.from_variables(model.trainable_variables)
            if self.method.bounds:
                methods.scipy_bounds(bounds, flat)
            if self.method.uses_dense_hessian:
                check_hessian_size(flat.size, self.settings.max_hessian_params)
        keras_compat.on_compile(model, _warn_if_reset)

    # ------------------------------------------------------------- Keras side
    def __call__(self, *args: Any) -> Any:
        caller = keras_compat.calling_model()
        if caller is not None and caller is not self.model:
            raise ValueError(
                f"This train function was made for model {self.model.name!r} and would train it, but "
                f"{caller.name!r}.fit called it. Make one per model: "
                f"{caller.name}.train_function = make_train_function({caller.name}, ...)."
            )
        self.fit_verbosity, self._fit_callbacks = keras_compat.calling_fit()
        try:
            return self._protocol(self, *args)
        finally:
            self.fit_verbosity, self._fit_callbacks = 0, None

    # ------------------------------------------------------------- iterations as Keras events
    def _checked_callbacks(self, callbacks: Any) -> list[Any]:
        if callbacks is None:
            return []
        if not isinstance(callbacks, (list, tuple)):
            callbacks = [callbacks]
        hooks = ("set_model", "set_params", "on_train_begin", "on_epoch_end", "on_train_batch_end", "on_train_end")
        for cb in callbacks:
            missing = [h for h in hooks if not callable(getattr(cb, h, None))]
            if missing:
                raise TypeError(
                    f"callbacks= takes Keras callbacks (keras.callbacks.Callback instances); {cb!r} lacks "
                    f"{missing}. Subclass keras.callbacks.Callback."
                )
        for cb in callbacks:
            cb.set_model(self.model)
            cb.set_params({"verbose": 0, "epochs": self.iteration_budget, "steps": 1})
        return list(callbacks)

    def _resume(self, path: Any) -> None:
        """Start from checkpoint ``path`` as its run left it: the weights, the iteration count and
        the evaluation counts (what scipy lets one restore; docs/callbacks.md lists what is lost)."""
        state = events.read_run_state(path, self.method.name)
        if not self.model.built:
            raise ValueError("resume_from= loads the checkpoint's weights into the model: build it first "
                             "(keras.Input(...) as its first layer, or model.build(input_shape)).")
        counts = {key: int(state[key]) for key in COUNTS}
        key = methods.budget_key(self.method)
        budget, done = self.options.get(key), counts["nfev" if key in ("maxfun", "max_nfev") else "nit"]
        if isinstance(budget, int) and budget <= done:
            raise ValueError(
                f"resume_from={os.fspath(path)!r}: its run had done {done} of {key}={budget} already. {key} counts "
                f"the whole run, the part before the checkpoint included: pass a larger maxiter to go on."
            )
        with warnings.catch_warnings():
            # The file may hold the compiled optimizer's slots, which a scipy run neither uses nor needs.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            self.model.load_weights(path)
        self.iterations_done, self.resumed_counts, self.resumed_state = int(state["iteration"]), counts, state

    def open_training(self, callbacks: list[Any]) -> bool:
        fit = self._fit_callbacks
        if fit is None:
            return True  # not inside fit: every run is a training of its own
        if self._training_for() is fit:
            return False  # a later epoch of the same fit
        self._training_for = weakref.ref(fit)

        def fit_ended() -> None:
            self._training_for = lambda: None
            events.Events.close(callbacks)

        keras_compat.on_train_end(self.model, fit, fit_ended)
        return True

    def close_training_after_run(self) -> bool:
        return self._fit_callbacks is None

    def epoch(self, iterator: Any) -> dict[str, Any]:
        """The first call of an epoch drains ``iterator`` (fit's, spanning the epoch) and runs scipy;
        the epoch's later calls return its logs."""
        protocol, steps = self._protocol, keras_compat.fit_steps_per_epoch(self.model)
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
        if steps is None and protocol.is_infinite(iterator):
            raise ValueError(
                "fit got an endless tf.data.Dataset (.repeat() without a count) and no steps_per_epoch, so an "
                "epoch's training set would never end. Pass steps_per_epoch=... (that many batches form each "
                "epoch's training set), or repeat the dataset a finite number of times."
            )
        count = None if steps is None else steps - len(first)
        batches = first + protocol.drain(iterator, count, self.max_data_bytes, self.model)
        self._source = _held_weakly(iterator)
        self._calls_left = math.ceil(steps / keras_compat.steps_per_execution(self.model)) - 1 if steps else 0
        return self.optimize(batches)

    def optimize(self, batches: list[Any]) -> dict[str, Any]:
        """One scipy run over the epoch's ``batches`` (as fit's iterator yields them); the epoch's logs."""
        protocol = self._protocol
        batches = protocol.prepare(batches)
        data = protocol.concatenate([keras_compat.unpack_x_y_sample_weight(self.model, b) for b in batches])
        self._logs = self.run(*data)
        keras_compat.keep_counts_integer(self.model, self._logs, COUNTS)
        return self._logs

    # ------------------------------------------------------------- scipy side
    def _objective_for(self, x: Any, y: Any, sample_weight: Any) -> Objective:
        if self.objective is None:
            cls = backends.objective_class(self.model, self._least_squares)
            if not self._least_squares and self.objective_class is not None:
                cls = self.objective_class
            self.objective = cls(self.model, x, y, sample_weight, **dataclasses.asdict(self.settings))
        else:
            self.objective.set_data(x, y, sample_weight)
        return self.objective


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
        A compiled Keras 3 model (TensorFlow, JAX or torch backend) or tf-keras model.
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
        ``jit_compile=``, ``hvp_mode=``, ``max_hessian_params=``, ``loss_over_rows=`` (``"mean"``
        or ``"sum"``: how a loss whose terms are unknown, such as an overridden ``compute_loss``,
        adds up over chunks of rows; measured before any optimization, then chunked). ``hessian="gauss-newton"``
        hands the Hessian-based minimize methods ``2 J^T J`` (products, or the dense matrix
        for trust-exact and dogleg) instead of the exact Hessian. For the least-squares
        methods: ``ftol``, ``xtol``, ``gtol``, ``x_scale``, ``loss``, ``f_scale``,
        ``max_nfev`` (``maxiter`` is an alias), ``tr_solver``, ``tr_options``;
        ``jacobian="dense"`` or ``"operator"`` (matrix-free with ``tr_solver="lsmr"``; the
        default picks it when the dense Jacobian would pass ``max_jacobian_bytes``). Options
        the method does not use are dropped with a warning. ``subproblem="in-graph"`` (trust-ncg
        only): scipy's CG-Steihaug subproblem solved inside one compiled call per outer
        iteration, with the same steps and counts (``keras_opt_ref.train.trust_ncg``); the default
        ``"scipy"`` leaves every product to scipy.
        ``blas_threads``: scipy's BLAS threads during each run (``keras_opt_ref.train.threads``):
        ``"auto"`` (default) one for the methods whose own work is vector operations (L-BFGS-B, CG,
        TNC, Newton-CG, trust-ncg, trust-krylov), so that they do not compete with the framework's
        threads, and unchanged for the others; ``None`` leaves BLAS alone; an int limits every method.

    Returns
    -------
    ScipyTrainFunction
        Assign it to ``model.train_function`` (after ``compile``). Its ``result`` holds
        the last ``OptimizeResult``.
    """
    return ScipyTrainFunction(model, method, maxiter, verbose, **options)


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
