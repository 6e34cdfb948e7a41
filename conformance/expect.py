"""Assertions that diagnose: what was expected, what came back, where the truth came from, and why.

Every failure message says, in the user's words, the value the implementation handed to
scipy, the suite's independent truth and its source (``model.evaluate``, finite
differences, lstsq), the difference against the tolerance, and what that means. Where the
suite can compute what a known bug would produce (the mean of per-batch means, the loss
without sample weights, ...), a match names the bug.
"""

from __future__ import annotations

import linecache
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import probes
from .spy import Call


class Refusal:
    """What a bad-input check accepts as a refusal: an exception raised on purpose, naming the problem."""

    # Raised on purpose: the exception types a refusal may have.
    ACCEPTED = (ValueError, TypeError, RuntimeError)
    # ... but not these, which are the signs of a crash.
    CRASHES = (NotImplementedError, RecursionError, IndexError, KeyError, AttributeError, NameError, UnboundLocalError)


def fit(impl, model, x, y=None, *, method="L-BFGS-B", maxiter=3, epochs=1, make_kwargs=None, **fit_kwargs):
    """make_train_function + fit, as a user writes it. Returns the History."""
    model.train_function = impl.make_train_function(model, method=method, maxiter=maxiter, **(make_kwargs or {}))
    return model.fit(x, y, epochs=epochs, verbose=0, **fit_kwargs)


def fit_ok(impl, model, x, y=None, **kwargs):
    """``fit`` that must succeed: an exception fails the check with what was asked and what was raised."""
    try:
        return fit(impl, model, x, y, **kwargs)
    except Exception as exc:
        asked = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k in ("method", "maxiter", "epochs", "batch_size"))
        raise AssertionError(
            f"fit raised {describe_exception(exc)} ({asked}) -- the implementation could not fit "
            "this valid problem, so nothing else could be checked."
        ) from exc


def fitted_call(impl, observe, model, x, y=None, **kwargs) -> tuple[Any, Call]:
    """fit (must succeed), then the scipy call it made; NotObserved if it made none. When scipy itself
    raised, the message says what the implementation had handed it."""
    before = len(observe.calls)
    try:
        history = fit_ok(impl, model, x, y, **kwargs)
    except AssertionError as failure:
        raised = [c for c in observe.calls[before:] if c.raised is not None]
        if raised and not isinstance(raised[-1].raised, (AssertionError, KeyboardInterrupt)):
            c = raised[-1]
            origin = _origin(c.raised)
            who = ("scipy rejected what the implementation handed it" if origin.startswith("scipy")
                   else "during scipy's run")
            same = failure.__cause__ is c.raised
            raise AssertionError(
                f"{c.describe()} raised {describe_exception(c.raised)} -- {who}. "
                + ("fit let it through: the implementation could not fit this valid problem, so nothing else could "
                   "be checked." if same else str(failure))
            ) from failure
        raise
    return history, observe.last


def history_value(history, key: str, epoch: int = -1):
    h = getattr(history, "history", None)
    if not isinstance(h, Mapping) or key not in h:
        keys = sorted(h) if isinstance(h, Mapping) else h
        raise AssertionError(f"history has no {key!r} (fit's History.history keys: {keys})")
    values = h[key]
    try:
        return values[epoch]
    except (IndexError, TypeError):
        raise AssertionError(f"history[{key!r}] = {values!r}: not one value per epoch") from None


def close_scalar(
    actual: float,
    expected: float,
    *,
    rtol: float,
    atol: float = 0.0,
    what: str,
    truth: str,
    why: str,
    known: Mapping[str, float] | None = None,
) -> None:
    """Fail unless ``actual`` matches ``expected``; name a known bug whose value it matches."""
    actual, expected = float(actual), float(expected)
    if np.isfinite(actual) and abs(actual - expected) <= atol + rtol * abs(expected):
        return
    if rtol < probes.FLOAT32_RTOL and probes.precision_of(actual, expected) == "float32":
        # precision is ruled out before any other cause is blamed
        raise AssertionError(f"{probes.float32_cause(what, actual, expected, truth)}; the check needs float64 "
                             f"(rtol {rtol:g}). (What it looks for otherwise: {why})")
    rel = abs(actual - expected) / max(abs(expected), 1e-300)
    message = (
        f"{what} = {actual:.6g} but {truth} = {expected:.6g} (relative difference {rel:.2g}, "
        f"tolerance {rtol:g}): {why}"
    )
    raise AssertionError(_with_known(message, _matches_known(actual, known, rtol)))


def close_vector(
    actual: Any,
    expected: Any,
    *,
    rtol: float,
    atol: float,
    what: str,
    truth: str,
    why: str,
    known: Mapping[str, Any] | None = None,
) -> None:
    """Element-wise ``|a - e| <= atol + rtol |e|``, else a message with the worst element and the overall error."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what} has shape {a.shape}, but {truth} has shape {e.shape}: {why}")
    bad = ~(np.abs(a - e) <= atol + rtol * np.abs(e))
    if not bad.any():
        return
    i = int(np.argmax(np.abs(a - e) - rtol * np.abs(e)))
    overall = float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))
    if rtol < probes.FLOAT32_RTOL and probes.FLOAT64_RTOL < overall <= probes.FLOAT32_RTOL:
        raise AssertionError(
            f"{what} matches {truth} only to float32 precision (||got - expected|| / ||expected|| = {overall:.2g}; "
            f"worst entry {i}: {a.flat[i]:.9g} vs {e.flat[i]:.9g}): it is computed in float32, not in the float64 of "
            f"the model; the check needs float64 (rtol {rtol:g}). (What it looks for otherwise: {why})")
    message = (
        f"{what} differs from {truth} in {int(bad.sum())} of {a.size} entries (worst: entry {i}, "
        f"{a.flat[i]:.6g} vs {e.flat[i]:.6g}; ||got - expected|| / ||expected|| = {overall:.2g}; "
        f"tolerance rtol={rtol:g}, atol={atol:g}): {why}"
    )
    raise AssertionError(_with_known(message, _matches_known(a, known, rtol)))


def _with_known(message: str, match: str) -> str:
    return f"{message.rstrip('.')}.{match}" if match else message


def _matches_known(actual: Any, known: Mapping[str, Any] | None, rtol: float) -> str:
    for name, value in (known or {}).items():
        v = np.asarray(value, dtype=np.float64)
        a = np.asarray(actual, dtype=np.float64)
        if v.shape == a.shape and np.all(np.abs(a - v) <= max(rtol, 1e-9) * (np.abs(v) + 1e-12)):
            return f" It equals {name}."
    return ""


def float64_vector(value: Any, n: int, what: str) -> np.ndarray:
    """The contract's boundary type: a float64 NumPy vector of length n."""
    if not isinstance(value, np.ndarray) or value.dtype != np.float64 or value.shape != (n,):
        raise AssertionError(
            f"{what} must be a float64 numpy vector of shape ({n},) at the scipy boundary; got "
            f"{type(value).__name__} dtype={getattr(value, 'dtype', None)} shape={getattr(value, 'shape', None)}"
        )
    return value


def expect_refusal(attempt: Callable[[], Any], *, problem: str, keywords: tuple[str, ...], observe) -> str:
    """The bad input must be refused on purpose, before any scipy work, with a message naming it.

    A refusal is a ValueError/TypeError/RuntimeError (not a crash type such as AttributeError,
    KeyError or a TensorFlow op error) whose message names the problem (one of ``keywords``,
    case-insensitive), raised before any ``scipy.optimize`` call.
    """
    before = len(observe.calls)
    try:
        attempt()
    except Refusal.ACCEPTED as exc:
        if isinstance(exc, Refusal.CRASHES):
            raise AssertionError(_crash(problem, exc)) from exc
        text = str(exc)
        if not any(k.lower() in text.lower() for k in keywords):
            raise AssertionError(
                f"{problem}: refused with {type(exc).__name__}: {reason(exc)!r}, but the message does not name "
                f"the problem (expected one of {list(keywords)}); a user cannot act on it."
            ) from exc
        if len(observe.calls) > before:
            c = observe.calls[before]
            evaluations = sum(c.counts.values())
            if evaluations or c.raised is None:
                raise AssertionError(
                    f"{problem}: refused only after scipy.optimize.{c.entry} had started and made {evaluations} "
                    "evaluation(s): bad input must be refused before any work."
                ) from exc
            observe.warn(
                f"{problem}: the implementation did not check it; it handed it to scipy.optimize.{c.entry}, which "
                f"refused it at its entry, before any evaluation ({type(exc).__name__}: {reason(exc)})."
            )
        return text
    except Exception as exc:
        raise AssertionError(_crash(problem, exc)) from exc
    raise AssertionError(
        f"{problem}: accepted without an error (fit returned normally). Expected a ValueError/TypeError naming "
        f"the problem ({' / '.join(keywords)})."
    )


def _crash(problem: str, exc: BaseException) -> str:
    return (
        f"{problem}: the implementation crashed instead of refusing: {describe_exception(exc)}. A refusal is a "
        "ValueError/TypeError raised on purpose, with a message naming the problem and the fix."
    )


# Code that is not the implementation's: its frames are skipped when naming where an exception came from.
_LIBRARIES = ("scipy", "numpy", "tensorflow", "keras", "tf_keras", "jax", "jaxlib", "torch", "_pytest", "pluggy",
              "keras_opt_ref_conformance", "conformance", "contextlib", "threading", "importlib")
_NUMBERS = re.compile(r"(?:[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[\s,;\]\[]+){12,}")


def _frames(exc: BaseException) -> list:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames


def _origin(exc: BaseException) -> str:
    """The module and line where ``exc`` was raised (the innermost frame)."""
    frames = _frames(exc)
    if not frames:
        return "unknown code"
    last = frames[-1]
    return f"{last.tb_frame.f_globals.get('__name__', '?')}, line {last.tb_lineno}"


def location(exc: BaseException) -> str:
    """Where ``exc`` came from in the implementation's own code: file, line, function and source line
    (the innermost frame outside scipy, numpy, the frameworks and the suite; else the innermost frame)."""
    frames = _frames(exc)
    if not frames:
        return ""
    mine = [tb for tb in frames if not _library_frame(tb)]
    tb = (mine or frames)[-1]
    code, source = tb.tb_frame.f_code, _source(tb)
    where = f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"
    return f"{where}: `{source}`" if source else where


def _source(tb) -> str:
    return (linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno) or "").strip()


def _library_frame(tb) -> bool:
    name = tb.tb_frame.f_globals.get("__name__", "") or ""
    if "__autograph_generated" in tb.tb_frame.f_code.co_filename:
        return True  # TensorFlow's rewrite of a tf.function: the frame that called it names the code
    if ".independent." in name or ".mutants." in name:
        return False  # the suite's own implementations under test are implementation code
    return name.split(".")[0] in _LIBRARIES


def reason(exc: BaseException, limit: int = 700) -> str:
    """The reason an exception gives, in one line that keeps it: stack dumps (TensorFlow's "defined at"
    frames) and runs of numbers (a tensor's values) are dropped, and a long text is cut in the middle,
    so both its start and its end (where TensorFlow puts the reason) remain."""
    text = str(exc)
    if not text.strip() and isinstance(exc, AssertionError):
        frames = _frames(exc)
        source = _source(frames[-1]) if frames else ""
        return f"a bare assert failed: `{source}`" if source else "a bare assert failed (no message)"
    text = " ".join(" ".join(_without_frames(text.splitlines())).split())
    text = _NUMBERS.sub("<numbers> ", text)
    if len(text) > limit:
        head = 2 * limit // 3
        text = f"{text[:head]} ... {text[-(limit - head - 5):]}"
    return text


def _without_frames(lines: list[str]) -> list[str]:
    """Drop stack frames (``File "...", line N, in f`` and the source lines indented under them)."""
    kept, frame_indent = [], None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if line.lstrip().startswith('File "'):
            frame_indent = indent
            continue
        if frame_indent is not None and indent > frame_indent and line.strip():
            continue  # the frame's source line
        frame_indent = None
        if line.strip():
            kept.append(line)
    return kept or lines


def describe_exception(exc: BaseException) -> str:
    """``Type: reason (raised at file:line in function: `source`)``."""
    where = location(exc)
    return f"{type(exc).__name__}: {reason(exc)}" + (f" (raised at {where})" if where else "")
