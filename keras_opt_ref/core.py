"""The backend contract: what stays the same on every backend, and the four things a backend adds.

The scipy driver (``scipy_optimizer``) talks to an :class:`Objective`: NumPy float64 in, NumPy
float64 out. Everything that does not depend on the framework lives here: the flat layout
(``flat``, a :class:`~keras_opt_ref.flat.FlatVariables`), the memo on a copy of the last ``x``,
the counters, the best finite point, the dense-Hessian size guard.

A backend subclasses :class:`Objective`, holds the epoch's data where its framework computes, and
implements four evaluations at a flat vector ``x`` (float64 NumPy, already checked for shape)::

    _compute_value(x) -> float                       Keras's full-batch loss
    _compute_value_and_grad(x) -> ndarray [f, g...]  one compiled call, gradient exact
    _compute_hvp(x, p) -> ndarray                    H(x) p by nested autodiff
    _compute_hessian(x) -> ndarray (n, n)            symmetric, one HVP per unit vector

each from its own ``x`` (stateless: any call order), over data chunked so that memory is bounded.
The backends: ``objective`` (TensorFlow, Keras 3 and tf-keras), ``jax_objective``,
``torch_objective``. :func:`objective_class` picks one for a model.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

from . import _keras

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_DATA_BYTES",
    "DEFAULT_MAX_HESSIAN_PARAMS",
    "HessianTooLargeError",
    "Objective",
    "backend_of",
    "check_hessian_size",
    "objective_class",
]

DEFAULT_CHUNK_SIZE = 65536
DEFAULT_MAX_HESSIAN_PARAMS = 5000
DEFAULT_MAX_DATA_BYTES = 4 * 2**30

# Keras backend -> the module and class of its objective.
BACKENDS = {
    "tensorflow": ("keras_opt_ref.objective", "FullBatchObjective"),
    "jax": ("keras_opt_ref.jax_objective", "JaxObjective"),
    "torch": ("keras_opt_ref.torch_objective", "TorchObjective"),
}

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


def backend_of(model: Any) -> str:
    """``"tensorflow"`` (tf-keras, or Keras 3 on TensorFlow), ``"jax"`` or ``"torch"``."""
    if _keras.flavour(model) == "tf_keras":
        return "tensorflow"
    import keras

    return keras.backend.backend()


def objective_class(model: Any) -> type:
    """The :class:`Objective` subclass for the model's backend."""
    backend = backend_of(model)
    if backend not in BACKENDS:
        raise ValueError(
            f"Keras backend {backend!r} is not supported; use one of {sorted(BACKENDS)} (KERAS_BACKEND=...)."
        )
    if backend == "tensorflow":
        from .distributed import DistributedObjective, strategy_of

        if strategy_of(model) is not None:  # variables under a tf.distribute strategy: shard the data
            return DistributedObjective
    module, name = BACKENDS[backend]
    return getattr(importlib.import_module(module), name)


class Objective:
    """Keras's full-batch loss as a function of one float64 weight vector (NumPy side).

    Subclasses set ``model``, ``flat``, ``num_samples``, ``chunk_size``, ``max_hessian_params``
    and implement the four ``_compute_*`` evaluations (module docstring).
    """

    backend = ""  # the Keras backend this objective computes on
    flat: Any
    max_hessian_params: int = DEFAULT_MAX_HESSIAN_PARAMS
    _memo_x: np.ndarray | None = None
    best_x: np.ndarray | None = None
    best_value: float = math.inf

    # ------------------------------------------------------------ the backend's part
    def _compute_value(self, x: np.ndarray) -> float:
        raise NotImplementedError

    def _compute_value_and_grad(self, x: np.ndarray) -> np.ndarray:
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


# ------------------------------------------------------------------ data, for the non-TF backends
class Chunks:
    """The epoch's data as NumPy, cut for a sequential loop: ``head`` holds ``count`` full chunks
    stacked on a new leading axis (``(count, rows, ...)``, or ``None``), ``tail`` the remaining rows
    (possibly none). ``head_shares[i]`` and ``tail_share`` weight each chunk's Keras loss so that the
    weighted sum is the one-batch loss (``checks.chunk_rule``); with rule ``"sum"`` every chunk's
    loss holds the weight regularizers, which ``extra_regularizers`` (``1 - chunks``) takes out."""

    def __init__(self, data: tuple[Any, Any, Any], rows: int, rule: str) -> None:
        import tensorflow as tf

        leaves = [t for t in tf.nest.flatten(data) if t is not None]
        n = int(leaves[0].shape[0])
        self.rows = c = min(rows, n)
        full, rest = divmod(n, c) if n > c else (0, n)
        self.count = full

        def cut(fn):
            return tf.nest.map_structure(lambda t: None if t is None else fn(t), data)

        self.head = cut(lambda t: t[: full * c].reshape(full, c, *t.shape[1:])) if full else None
        self.tail = cut(lambda t: t[full * c :])
        if rule == "sum":
            self.head_shares, self.tail_share = np.ones(full), 1.0 if rest else 0.0
        elif rule == "sample_weight":
            weights = np.asarray(tf.nest.flatten(data[2])[0], dtype=np.float64).reshape(n, -1).sum(axis=1)
            total = weights.sum()
            scale = 1.0 / total if total else 0.0
            self.head_shares = weights[: full * c].reshape(full, c).sum(axis=1) * scale
            self.tail_share = float(weights[full * c :].sum() * scale) if rest else 0.0
        else:
            self.head_shares, self.tail_share = np.full(full, c / n), rest / n
        chunks = full + (1 if rest else 0)
        self.extra_regularizers = (1.0 - chunks) if rule == "sum" and chunks > 1 else 0.0
        self.has_tail = bool(rest)


def numpy_data(data: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    """Validated data (``checks.as_tensors``) as NumPy arrays, structure kept."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: None if t is None else np.asarray(t), data)


def eager_facts(model: Any, data: tuple[Any, Any, Any], rows: int, to_backend: Any) -> Any:
    """Run the model and ``compute_loss`` eagerly on each chunk of ``rows`` (NumPy data, moved with
    ``to_backend``): surfaces data errors before any compiled work and records what the calls show
    about the loss (``checks.LossFacts``). A non-finite loss at the start is refused (on JAX an
    out-of-range Embedding id gives NaN rather than an error)."""
    import tensorflow as tf

    from . import checks
    from .objective import _batch_level_losses

    facts = checks.LossFacts()
    n = int([t for t in tf.nest.flatten(data) if t is not None][0].shape[0])
    for start in range(0, n, rows):
        x, y, sample_weight = tf.nest.map_structure(
            lambda t, s=start: None if t is None else to_backend(t[s : s + rows]), data)
        try:
            y_pred = model(x, training=False)
            outputs = tf.nest.flatten(y_pred)
            facts.add_losses = max(facts.add_losses, _keras.add_loss_count(model))
            facts.masked = facts.masked or any(_keras.output_mask(t) is not None for t in outputs)
            names = list(getattr(model, "output_names", None) or [])
            facts.output_names = sorted(y_pred) if isinstance(y_pred, dict) else (
                names if len(names) == len(outputs) else [str(i) for i in range(len(outputs))])
            facts.batch_level = _batch_level_losses(model, y, outputs)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise ValueError(
                f"The model cannot evaluate its training data ({checks.summary(exc)}). Check the inputs' "
                "shapes, dtypes and index ranges (e.g. Embedding ids < input_dim)."
            ) from exc
        facts.loss_shape = tuple(int(d) for d in np.shape(np.asarray(_keras_numpy(loss))))
        checks.check_loss_facts(facts)
        value = float(np.asarray(_keras_numpy(loss)))
        if not math.isfinite(value):
            raise ValueError(
                f"The loss on samples [{start}, {min(start + rows, n)}) at the starting weights is {value}: the "
                "optimization cannot start. Check the data (Embedding ids must be < input_dim: out-of-range ids "
                "read NaN on this backend) and the starting weights."
            )
    return facts


def weight_regularization(flat: Any, values: list[Any]) -> Any:
    """Keras 3's weight-regularization terms at ``values`` (one per variable of ``flat``): what
    ``model.losses`` holds for the weights, computed from the given values (0 if none)."""
    terms = [v.regularizer(value) for v, value in zip(flat.variables, values, strict=True)
             if getattr(v, "regularizer", None) is not None]
    return sum(terms[1:], terms[0]) if terms else np.zeros((), np.float32)


def _keras_numpy(value: Any) -> Any:
    import keras

    return keras.ops.convert_to_numpy(value)


def make_objective(model: Any, x: Any, y: Any = None, sample_weight: Any = None, **settings: Any) -> Objective:
    """The full-batch objective of ``model`` on ``(x, y, sample_weight)`` for the model's backend
    (settings as ``objective.FullBatchObjective``): ``value``, ``value_and_grad``, ``hessp``,
    ``hessian`` on float64 NumPy vectors, without ``fit``."""
    return objective_class(model)(model, x, y, sample_weight, **settings)
