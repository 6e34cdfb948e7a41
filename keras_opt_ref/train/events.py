"""A run's iterations as Keras events: callbacks, the live progress line, stop requests, run state.

For the callbacks given to ``make_train_function(callbacks=...)``, each scipy iteration is one
epoch of one step: ``on_epoch_begin``, ``on_train_batch_begin``, ``on_train_batch_end`` and
``on_epoch_end``, with the iteration's logs (``loss``, ``grad_norm``, ``nit``, ``nfev``, ``njev``,
``nhev``) and the model holding the iterate. Epochs are numbered by the iterations this train
function has run (or resumed from), so EarlyStopping's patience, CSVLogger's rows,
TensorBoard's steps and ModelCheckpoint's ``save_freq`` and ``{epoch}`` all count iterations.
``on_train_begin``/``on_train_end`` frame one ``fit`` (or one run when nothing else calls it).

Callbacks given to ``fit`` see fit's own epochs (one scipy run each), as before: that list is a
local of ``fit`` on every backend, and its callbacks also receive fit's epoch events, so handing
them iterations as epochs too would double every CSV row and make EarlyStopping count fit's epoch
as an iteration. ``fit``'s ``verbose=1`` does reach the run: it shows a live progress line.

``model.stop_training = True`` set by a callback ends the run at the end of that iteration
(:class:`StopRequested`, raised past scipy for every method); the run ends like any other early
stop, at the best point evaluated. Beside every file a callback writes through ``_get_file_path``
(ModelCheckpoint) the run state is written, ``<file>.run.json``, which ``resume_from=`` reads.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from ..base import keras_compat
from .progress import LiveLine

__all__ = ["RUN_STATE_SUFFIX", "Events", "StopRequested", "read_run_state"]

RUN_STATE_SUFFIX = ".run.json"
RUN_STATE_FORMAT = 1
# Keras callbacks that write files or print: on several workers only the chief runs them, unless they
# write on the chief alone themselves (keras_compat.chief_only_writer: tf-keras's). The others
# (EarlyStopping, TerminateOnNaN, a user's own) run on every worker, which see the same logs bit for
# bit, so every worker stops at the same iteration.
WRITERS = frozenset({"ModelCheckpoint", "CSVLogger", "TensorBoard", "BackupAndRestore", "ProgbarLogger",
                     "RemoteMonitor"})


class StopRequested(Exception):
    """A callback set ``model.stop_training``: the run ends at the end of this iteration."""


class Events:
    """The scipy iterations of one run, sent to the train function's callbacks and progress line."""

    def __init__(self, owner: Any, objective: Any, calls: Any, njev_of: Any, fit_verbosity: int) -> None:
        self.owner, self.objective, self.calls, self.njev_of = owner, objective, calls, njev_of
        self.model = owner.model
        chief = getattr(objective, "is_chief", True)
        self.callbacks = [cb for cb in owner.callbacks
                          if chief or type(cb).__name__ not in WRITERS or keras_compat.chief_only_writer(cb)]
        self.chief = chief
        self.offset = owner.resumed_counts  # counts of the run this one resumes (zeros otherwise)
        self.epoch = owner.iterations_done  # the callbacks' epoch number of this run's first iteration
        self.target = owner.iteration_budget
        self.progbar = None
        if chief and fit_verbosity == 1 and not owner.verbose:
            self.progbar = LiveLine(self.target)
        self.stopped_by: str | None = None
        self.stopping_before = False
        self.last_logs: dict[str, Any] = {}
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # the last iterate and its gradient

    @property
    def active(self) -> bool:
        return bool(self.callbacks) or self.progbar is not None

    def begin(self) -> None:
        """Before the first iteration: ``on_train_begin`` once per fit (or per run)."""
        if not self.callbacks:
            return
        # A request made before the run (fit ends after this step anyway) is kept for fit, not
        # taken as one of the run's callbacks asking to stop.
        self.stopping_before = bool(getattr(self.model, "stop_training", False))
        self.model.stop_training = False
        if self.owner.open_training(self.callbacks):
            for cb in self.callbacks:
                cb.on_train_begin()

    def iteration(self, nit: int, x: np.ndarray, loss: float, gradient: np.ndarray | None) -> None:
        """Iteration ``nit`` of this run ended at ``x``; raises :class:`StopRequested` when a
        callback asked to stop."""
        if gradient is None and self.previous is not None and np.array_equal(x, self.previous[0]):
            gradient = self.previous[1]  # a rejected step: still at the last iterate, whose gradient is known
        elif gradient is not None:
            self.previous = (x.copy(), gradient)  # x may be scipy's own buffer, updated in place
        logs = self.last_logs = self.logs(nit, loss, gradient)
        if self.progbar is not None:
            self.progbar.update(nit, logs)
        if not self.callbacks:
            return
        if not self.objective.weights_hold(x):  # usually the last point evaluated, which they hold
            self.objective.set_weights(x)  # what a checkpoint saves and a callback reads: the iterate
        epoch = self.epoch
        watched = self._checkpoint_files(epoch, logs) if self.chief else []  # only the chief writes run state
        before = {path: _stamp(path) for path in watched}
        self._send("on_epoch_begin", epoch)
        self._send("on_train_batch_begin", 0)
        self._send("on_train_batch_end", 0, logs)
        self._send("on_epoch_end", epoch, logs)
        self.epoch += 1
        self.objective.weights_touched()  # a callback may have written them (restore_best_weights)
        for path in watched:
            if _stamp(path) != before[path] and os.path.exists(path):
                self._write_run_state(path, logs)
        if self.stopped_by is not None:
            raise StopRequested(self.stopped_by)

    def non_finite(self, nit: int, loss: float) -> None:
        """An evaluation inside iteration ``nit`` was not finite: the step ends with that loss
        (TerminateOnNaN sees it and stops fit), and the run ends."""
        if self.callbacks:
            logs = self.logs(nit, loss, None)
            self._send("on_train_batch_end", 0, logs)

    def end(self, nit: int, fun: float) -> None:
        if self.progbar is not None:
            self.progbar.update(nit, {"loss": fun, **{k: v for k, v in self.last_logs.items() if k != "loss"}},
                                final=True)
        self.owner.iterations_done = self.epoch
        if not self.callbacks:
            return
        if self.stopping_before:
            self.model.stop_training = True
        if self.owner.close_training_after_run():
            self.close(self.callbacks)

    @staticmethod
    def close(callbacks: list[Any]) -> None:
        for cb in callbacks:
            cb.on_train_end()

    def logs(self, nit: int, loss: float, gradient: np.ndarray | None) -> dict[str, Any]:
        calls, offset = self.calls, self.offset
        return {
            "loss": float(loss),
            "grad_norm": float(np.linalg.norm(gradient)) if gradient is not None else math.nan,
            "nit": offset["nit"] + nit,
            "nfev": offset["nfev"] + calls["fun"],
            "njev": offset["njev"] + self.njev_of(calls),
            "nhev": offset["nhev"] + calls["hev"],
        }

    def _send(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)
            if self.stopped_by is None and getattr(self.model, "stop_training", False):
                self.stopped_by = type(cb).__name__

    def _checkpoint_files(self, epoch: int, logs: dict[str, Any]) -> list[str]:
        """The files the checkpoint callbacks would write at this epoch (Keras names them with
        ``_get_file_path(epoch, batch, logs)``, on Keras 3 and tf-keras alike)."""
        paths: list[str] = []
        for cb in self.callbacks:
            name_of = getattr(cb, "_get_file_path", None)
            if name_of is None:
                continue
            for batch in (None, 0):
                try:
                    path = os.fspath(name_of(epoch, batch, dict(logs)))
                except Exception:  # a filepath naming keys this run does not log: nothing to watch
                    continue
                if path not in paths:
                    paths.append(path)
        return paths

    def _write_run_state(self, path: str, logs: dict[str, Any]) -> None:
        owner = self.owner
        state = {
            "format": RUN_STATE_FORMAT,
            "checkpoint": os.path.basename(path),
            "method": owner.method.name,
            "iteration": self.epoch,  # iterations done, all runs of this train function
            **{key: int(logs[key]) for key in ("nit", "nfev", "njev", "nhev")},
            "loss": logs["loss"],
            "grad_norm": logs["grad_norm"],
            "options": {k: v for k, v in owner.options.items() if isinstance(v, (int, float, str, bool))},
        }
        tmp = path + RUN_STATE_SUFFIX + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path + RUN_STATE_SUFFIX)  # atomic: a kill leaves the old state or the new


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_run_state(path: str, method: str) -> dict[str, Any]:
    """The run state written beside checkpoint ``path``, checked against the resuming method."""
    state_path = os.fspath(path) + RUN_STATE_SUFFIX
    if not os.path.exists(os.fspath(path)):
        raise ValueError(f"resume_from={os.fspath(path)!r}: no such checkpoint file")
    if not os.path.exists(state_path):
        raise ValueError(
            f"resume_from={os.fspath(path)!r}: there is no run state beside it ({os.path.basename(state_path)}), so "
            "the iteration and the evaluation counts it was written at are unknown. Resume from a file written "
            "during a run by a ModelCheckpoint passed to make_train_function(callbacks=[...]); to start afresh "
            "from these weights, load them (model.load_weights(...)) and leave resume_from out."
        )
    with open(state_path) as f:
        state = json.load(f)
    if state.get("format") != RUN_STATE_FORMAT:
        raise ValueError(f"resume_from: {state_path} has run-state format {state.get('format')!r}, "
                         f"this version reads {RUN_STATE_FORMAT}")
    if state["method"] != method:
        raise ValueError(
            f"resume_from={os.fspath(path)!r} was written by a {state['method']!r} run; this train function "
            f"runs {method!r}. Resume with method={state['method']!r}, or load the weights and start a new run."
        )
    return state
