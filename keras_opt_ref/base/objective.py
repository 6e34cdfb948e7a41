"""The backend contract: what stays the same on every backend, and what a backend adds.

The scipy run (``train``) talks to an :class:`Objective`: NumPy float64 in, NumPy float64 out.
Everything that does not depend on the framework lives here: the one constructor (settings,
model and data checks, the flat layout ``flat``, a :class:`~keras_opt_ref.base.flat.FlatVariables`),
the memo on a copy of the last ``x``, the counters, the best finite point, the dense-Hessian guard.

A backend (``keras_opt_ref.backends.<name>.objective``) subclasses :class:`Objective`, holds the
epoch's data where its framework computes, and implements::

    _loss_facts(data) -> checks.LossFacts            run the model and its loss once per chunk
    _setup()                                         backend state, once ``flat`` is known
    _hold(data, rows)                                hold the checked data, in chunks of ``rows``
    _compute_value(x) -> float                       Keras's full-batch loss
    _device_vector(x) -> w                           x in the compute dtype, where the backend computes
    _value_and_grad_call(w) -> out                   [f, g...] by one compiled call, gradient exact, ready
    _to_host(out) -> ndarray                         out as float64 NumPy (the one host sync)
    _compute_hvp(x, p) -> ndarray                    H(x) p by nested autodiff
    _compute_hessian(x) -> ndarray (n, n)            symmetric, one HVP per unit vector

each evaluation from its own ``x`` (float64 NumPy, already checked for shape; stateless: any
call order), over data chunked so that memory is bounded. The loss and gradient are the three
steps in turn (``_compute_value_and_grad``), so that ``bench.boundary`` can time each.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from . import checks, data, keras_compat, nest
from .flat import FlatVariables
from .settings import DEFAULT_MAX_HESSIAN_PARAMS, Settings

__all__ = [
    "HessianTooLargeError",
    "Objective",
    "check_hessian_size",
    "weight_regularization",
]

# Methods that need no dense Hessian; named in the refusal message.
_HESSIAN_FREE = "trust-ncg, trust-krylov, Newton-CG (Hessian-vector products) or L-BFGS-B"


class HessianTooLargeError(ValueError):
    """The dense Hessian would not fit the configured limit."""


def check_hessian_size(n: int, max_hessian_params: int) -> None:
    """Refuse a dense ``n x n`` Hessian above the limit, saying what it would need."""
    if n > max_hessian_params:
        gib = n * n * 8 / 2**30
        raise HessianTooLargeError(
            f"A dense Hessian of {n} weights needs {n}x{n} float64 = {gib:.2f} GiB "
            f"(limit: max_hessian_params={max_hessian_params}). Use a method that "
            f"needs no dense Hessian -- {_HESSIAN_FREE} -- or raise max_hessian_params "
            "if the memory and time (one HVP per weight) are acceptable."
        )


class Objective:
    """Keras's full-batch loss as a function of one float64 weight vector (NumPy side).

    Parameters
    ----------
    model
        A compiled Keras model (Keras 3 on the subclass's backend, or tf-keras on TensorFlow).
    x, y, sample_weight
        The whole training set, as accepted by ``model(x)`` and ``model.compute_loss``: arrays,
        tensors, or lists/dicts of them for multi-input/-output models.
    **settings
        :class:`~keras_opt_ref.base.settings.Settings` (``chunk_size``, ``jit_compile``,
        ``hvp_mode``, ``max_hessian_params``, ``deterministic``, ``max_data_bytes``), checked
        before any work.
    """

    backend = ""  # the Keras backend this objective computes on
    # Whether a float64 model's loss is computed in float64 (Keras 3.15 on JAX and torch computes many
    # ops, tanh and means among them, in float32: its result_type maps float64 to float32 there).
    computes_float64 = True
    default_hvp_mode = "reverse-over-reverse"  # what hvp_mode=None means here
    flat_class = FlatVariables
    flat: Any
    max_hessian_params: int = DEFAULT_MAX_HESSIAN_PARAMS
    _memo_x: np.ndarray | None = None
    best_x: np.ndarray | None = None
    best_value: float = math.inf

    def __init__(self, model: Any, x: Any, y: Any = None, sample_weight: Any = None, **settings: Any) -> None:
        self.settings = s = Settings.checked(**settings)
        checks.check_model(model, deterministic=s.deterministic)
        self.model = model
        self.chunk_size, self.max_data_bytes = s.chunk_size, s.max_data_bytes
        self.max_hessian_params, self.max_jacobian_bytes = s.max_hessian_params, s.max_jacobian_bytes
        self.hvp_mode = s.hvp_mode or self.default_hvp_mode
        self.jit_compile = s.jit_compile is not False
        checked = self._validated(x, y, sample_weight)  # runs the model: builds it if it is not yet
        checks.check_trainable(model)
        self.flat = self.flat_class.from_variables(model.trainable_variables)
        self._setup()
        self._hold_data(checked)
        self.reset_counters()

    def set_data(self, x: Any, y: Any = None, sample_weight: Any = None) -> None:
        """Hold a new training set (checked first; data of the same shapes reuses compiled code)."""
        self._hold_data(self._validated(x, y, sample_weight))

    def _validated(self, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
        """The training set dense and checked, through the model; sets ``num_samples``, ``facts``
        and ``rule`` (``""`` with the reason in ``why`` when no chunk rule is exact)."""
        dense = data.as_dense((x, y, sample_weight), self.max_data_bytes, self._convert_leaf)
        self.num_samples = data.check_data(dense)
        self.facts = self._loss_facts(dense)
        checks.check_loss_facts(self.facts)
        declared = self.settings.loss_over_rows
        self.rule, self.why = checks.chunk_rule(self.model, self.facts, dense[2], declared)
        if declared and self.num_samples > 1:
            self._measure_declared(declared, dense)
        return dense

    def _measure_declared(self, declared: str, dense: tuple[Any, Any, Any]) -> None:
        """A declared ``loss_over_rows``, measured at the starting weights on the first two chunks (the
        two halves of data that fits one chunk: replicas or a later, larger training set cut it too):
        their loss in one piece against the chunks' losses combined as the objective combines them
        (``checks.check_declared_rule``). Memory: two chunks, eagerly, values only."""
        n = self.num_samples
        rows, total = (self.chunk_size, min(n, 2 * self.chunk_size)) if n > self.chunk_size else (n // 2, n)
        cut = lambda a, b: nest.map_data(lambda t: t[a:b], dense)  # noqa: E731
        whole = checks.loss_eagerly(self.model, cut(0, total), self._backend_tensor)
        parts = (checks.loss_eagerly(self.model, cut(0, rows), self._backend_tensor),
                 checks.loss_eagerly(self.model, cut(rows, total), self._backend_tensor))
        regularizers, _ = keras_compat.variable_regularizers(self.model)
        variables = {id(v): v for v in self.model.trainable_variables}
        regularization = sum(checks.as_float(r(variables[key])) for key, r in regularizers.items() if key in variables)
        dtypes = {checks.numpy_dtype_name(v.dtype) for v in self.model.trainable_variables}
        exact = dtypes == {"float64"} and self.computes_float64
        checks.check_declared_rule(declared, whole, parts, (rows, total - rows), regularization,
                                   "float64" if exact else "float32")

    def _hold_data(self, dense: tuple[Any, Any, Any]) -> None:
        n, rows = self.num_samples, self.chunk_size
        if not self.rule:
            rows = self._without_rule(n, rows)
        self.rule = self.rule or "rows"
        self._hold(dense, min(rows, n))
        self.forget()

    def _without_rule(self, n: int, rows: int) -> int:
        """No chunk rule adds up to Keras's loss (``self.why``): the data goes in one piece."""
        if n > rows:
            warnings.warn(
                f"All {n} samples are evaluated in one piece, not in chunks of chunk_size={rows}: {self.why}, so "
                "chunk values are not known to add up to Keras's loss. Memory is not bounded by chunk_size here. If "
                "the loss is a mean over the rows of the data (plus terms that do not depend on the data), declare "
                "it with loss_over_rows='mean' ('sum' for a sum over rows): it is checked, then chunked.",
                UserWarning,
                stacklevel=4,
            )
        return n

    # ------------------------------------------------------------ the backend's part
    _convert_leaf = None  # how a data leaf becomes dense (None: NumPy, ``data.to_numpy``)

    def _backend_tensor(self, leaf: Any) -> Any:
        """A NumPy data leaf as the backend's eager tensor (for eager calls of the model)."""
        raise NotImplementedError

    def _loss_facts(self, dense: tuple[Any, Any, Any]) -> checks.LossFacts:
        raise NotImplementedError

    def _setup(self) -> None:
        """Backend state that needs ``flat`` (before the data is held)."""

    def _hold(self, dense: tuple[Any, Any, Any], rows: int) -> None:
        raise NotImplementedError

    def _compute_value(self, x: np.ndarray) -> float:
        raise NotImplementedError

    def _compute_value_and_grad(self, x: np.ndarray) -> np.ndarray:
        return self._to_host(self._value_and_grad_call(self._device_vector(x)))

    def _device_vector(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def _value_and_grad_call(self, w: Any) -> Any:
        raise NotImplementedError

    def _to_host(self, out: Any) -> np.ndarray:
        raise NotImplementedError

    def _compute_hvp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _compute_hessian(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------ numpy API
    @property
    def size(self) -> int:
        return self.flat.size

    def reset_counters(self) -> None:
        """Counts of compiled evaluations: values, gradients, HVPs, dense Hessians."""
        self.nfev = self.ngev = self.nhvp = self.nhess = 0

    def forget(self) -> None:
        """Drop the memo and the best point (new data: old values no longer hold)."""
        self._memo_x = None
        self.best_x, self.best_value = None, math.inf

    def value(self, x: np.ndarray) -> float:
        """Full-batch loss at ``x``."""
        x = self.flat.as_vector(x)
        if self._memo_hit(x):
            return self._memo_f
        self.nfev += 1
        f = float(self._compute_value(x))
        self._remember(x, f, None)
        return f

    def gradient(self, x: np.ndarray) -> np.ndarray:
        """Exact gradient at ``x`` (float64, a new array)."""
        return self.value_and_grad(x)[1]

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and gradient at ``x`` from one compiled call (memoized on ``x``)."""
        x = self.flat.as_vector(x)
        if not (self._memo_hit(x) and self._memo_g is not None):
            self.nfev += 1
            self.ngev += 1
            out = self._compute_value_and_grad(x)  # [f, g...]
            self._remember(x, float(out[0]), out[1:])
        # A copy: a solver that updates its gradient in place must not touch the cache.
        return self._memo_f, self._memo_g.copy()

    def hessp(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Exact Hessian-vector product ``H(x) @ p`` by nested autodiff."""
        x = self.flat.as_vector(x)
        p = self.flat.as_vector(p)
        self.nhvp += 1
        return self._compute_hvp(x, p)

    def hessian(self, x: np.ndarray) -> np.ndarray:
        """Dense symmetric Hessian at ``x``, shape ``(n, n)``; refused above ``max_hessian_params``."""
        self.check_hessian_size()
        x = self.flat.as_vector(x)
        self.nhess += 1
        return self._compute_hessian(x)

    def check_hessian_size(self) -> None:
        check_hessian_size(self.size, self.max_hessian_params)

    def set_weights(self, x: np.ndarray) -> None:
        """Write ``x`` into the model's trainable variables."""
        self.flat.write(self.flat.as_vector(x))

    def weights_hold(self, x: np.ndarray) -> bool:
        """Whether the model's variables already hold ``x`` (rounded to their dtypes), so that
        :meth:`set_weights` would change nothing. Here: never known (a backend whose evaluations
        assign the weights says otherwise)."""
        return False

    def weights_touched(self) -> None:
        """Someone else (a callback) may have written the variables since the last evaluation."""

    def cached(self, x: np.ndarray) -> tuple[float, np.ndarray | None] | None:
        """``(value, gradient or None)`` if ``x`` is the last point evaluated, else ``None``."""
        x = np.asarray(x, dtype=np.float64)
        return (self._memo_f, self._memo_g) if self._memo_hit(x) else None

    def known_value(self, x: np.ndarray) -> float | None:
        """The loss at ``x`` if an evaluation already gave it (the last point, or the best one as the
        variables hold it), else ``None``: after a failure the model need not run again."""
        cached = self.cached(x)
        if cached is not None:
            return cached[0]
        if self.best_x is not None and np.array_equal(self.flat.as_held(self.best_x), x):
            return self.best_value
        return None

    def _memo_hit(self, x: np.ndarray) -> bool:
        return self._memo_x is not None and np.array_equal(x, self._memo_x)

    def _remember(self, x: np.ndarray, f: float, g: np.ndarray | None) -> None:
        self._memo_x, self._memo_f, self._memo_g = x.copy(), f, g
        if math.isfinite(f) and f < self.best_value:
            self.best_value, self.best_x = f, self._memo_x  # shared: neither is ever written to


def weight_regularization(flat: Any, values: list[Any]) -> Any:
    """Keras 3's weight-regularization terms at ``values`` (one per variable of ``flat``): what
    ``model.losses`` holds for the weights, computed from the given values (0 if none)."""
    terms = [v.regularizer(value) for v, value in zip(flat.variables, values, strict=True)
             if getattr(v, "regularizer", None) is not None]
    return sum(terms[1:], terms[0]) if terms else np.zeros((), np.float32)
