"""Independent ground truth: the suite's own weight layout, finite differences, evaluate."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


def trainable_vector(model) -> np.ndarray:
    """The interface's layout: model.trainable_variables in order, each in C order, float64."""
    return np.concatenate([np.asarray(v.numpy(), dtype=np.float64).ravel() for v in model.trainable_variables])


def set_trainable_vector(model, x: np.ndarray) -> None:
    offset = 0
    for v in model.trainable_variables:
        size = int(np.prod(v.shape))
        dtype = str(getattr(v.dtype, "name", v.dtype))
        v.assign(np.asarray(x[offset : offset + size]).reshape(tuple(v.shape)).astype(dtype))
        offset += size
    if offset != x.size:
        raise ValueError(f"vector of {x.size} for {offset} trainable weights")


def keras_loss(model, x, y=None, sample_weight=None) -> float:
    """Keras's own loss over the whole data set in one batch: ``model.evaluate(batch_size=N)``; for
    a model under a tf.distribute strategy, ``model.compute_loss`` on all of it, outside the strategy
    (Keras's evaluate splits the batch over the replicas and fails on uneven parts; inside the
    strategy's scope Keras divides its loss by the number of replicas)."""
    if under_a_strategy(model):
        return _outside_any_strategy(lambda: float(model.compute_loss(
            x=x, y=y, y_pred=model(x, training=False), sample_weight=sample_weight)))
    n = len(_first_leaf(x))
    out = model.evaluate(x, y, sample_weight=sample_weight, batch_size=n, verbose=0)
    return float(out[0] if isinstance(out, (list, tuple)) else out)


def under_a_strategy(model) -> bool:
    """Whether the model's variables belong to a tf.distribute strategy (TensorFlow backend)."""
    try:
        import tensorflow as tf
    except ImportError:
        return False
    variables = model.trainable_variables
    return bool(variables) and isinstance(getattr(variables[0], "value", variables[0]), tf.distribute.DistributedValues)


def _outside_any_strategy(fn):
    """``fn()`` in a fresh thread: tf.distribute scopes are per thread, so none is active there."""
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@contextmanager
def weights_set_to(model, w: np.ndarray):
    """Inside the block the model's trainable weights are ``w``; afterwards they are restored."""
    saved = trainable_vector(model)
    try:
        set_trainable_vector(model, w)
        yield model
    finally:
        set_trainable_vector(model, saved)


def keras_loss_at(model, w: np.ndarray, x, y=None, sample_weight=None) -> float:
    with weights_set_to(model, w):
        return keras_loss(model, x, y, sample_weight)


def per_batch_mean_loss(model, w: np.ndarray, x, y, batch_size: int, sample_weight=None) -> float:
    """The mean of per-batch losses over fit's batches: keras-opt's objective, wrong for uneven batches."""
    n = len(_first_leaf(x))
    losses = []
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        sw = None if sample_weight is None else sample_weight[part]
        losses.append(keras_loss_at(model, w, _rows(x, part), _rows(y, part), sw))
    return float(np.mean(losses))


def regularization_at(model, w: np.ndarray, x) -> float:
    """The data-independent part of Keras's loss at w (weight regularizers and add_loss terms)."""
    with weights_set_to(model, w):
        model(_rows(x, slice(0, 1)), training=False)  # add_loss terms are recorded by a call
        return float(sum(_numpy(t) for t in model.losses)) if model.losses else 0.0


def mse_in_training_mode(model, w: np.ndarray, x, y) -> float:
    """mean((model(x, training=True) - y)**2) at w: what an objective run in training mode computes."""
    with weights_set_to(model, w):
        pred = _numpy(model(x, training=True))
        return float(np.mean((pred - np.asarray(y, dtype=np.float64)) ** 2))


def _numpy(tensor) -> np.ndarray:
    """A backend's tensor as float64 NumPy (torch's may require grad: detached)."""
    if type(tensor).__module__.startswith("torch"):
        tensor = tensor.detach().cpu()
    return np.asarray(tensor, dtype=np.float64)


def _rows(data, part: slice):
    if data is None:
        return None
    if isinstance(data, (list, tuple)):
        return type(data)(_rows(d, part) for d in data)
    if isinstance(data, dict):
        return {k: _rows(v, part) for k, v in data.items()}
    return data[part]


def working_precision(keras) -> str:
    """``"float64"`` if a float64 Keras model really computes in float64 on this backend, else
    ``"float32"``. Keras 3 on JAX and torch promotes float64 to float32 in many ops (tanh, means:
    ``keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE``), so a "float64" model's loss carries
    float32 rounding there, and finite differences must be taken with wider steps and tolerances."""
    if not hasattr(keras, "ops"):
        return "float64"  # tf-keras: TensorFlow computes float64 models in float64
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 1))
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    model.compile(loss="mse")
    w1, b1, w2, b2 = (np.asarray(w, dtype=np.float64) for w in model.get_weights())
    expected = float(np.mean((np.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2))
    got = keras_loss(model, x, y)
    return "float64" if abs(got - expected) <= 1e-13 * abs(expected) else "float32"


class Steps:
    """Finite-difference steps and tolerances for the working precision.

    float64: h = 1e-6 (gradient), 1e-5 (HVP); truncation plus rounding below ~1e-8 relative, so
    rtol 1e-6 (``rtol``), and 1e-9 for what exact arithmetic gives (linearity, symmetry: ``exact``).
    float32 arithmetic inside a float64 model (noise up to ~1e-7 of the loss): h = 1e-2 (3e-3 for
    HVPs, which difference exact gradients) balances rounding (noise / h) and truncation (h^2), both
    ~1e-5; rtol 1e-3 still catches dropped terms,
    wrong signs, scales and weights, subsets of the data; float32 gradients are what the backend
    computes there and are not an error.
    """

    def __init__(self, precision: str) -> None:
        self.precision = precision
        if precision == "float64":
            self.h, self.h_hvp, self.rtol, self.atol, self.exact, self.value = 1e-6, 1e-5, 1e-6, 1e-8, 1e-9, 1e-9
        else:
            self.h, self.h_hvp, self.rtol, self.atol, self.exact, self.value = 1e-2, 3e-3, 1e-3, 1e-5, 1e-5, 1e-6
        self.order = 2 if precision == "float64" else 4  # wide steps: the five-point stencil keeps truncation small
        self.fd = f"{'float64' if precision == 'float64' else 'wide-step (float32-arithmetic)'} central differences"


def central_gradient(f, x: np.ndarray, h: float = 1e-6, order: int = 2) -> np.ndarray:
    """Central differences of order 2, or 4 (the five-point stencil: truncation O(h^4), for the wide steps
    that float32 arithmetic needs)."""
    g = np.empty_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        if order == 4:
            g[i] = (8 * (f(x + e) - f(x - e)) - (f(x + 2 * e) - f(x - 2 * e))) / (12 * h)
        else:
            g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def central_jacobian(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Columns (f(x + h e_i) - f(x - h e_i)) / 2h of a vector function."""
    columns = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        columns.append((np.asarray(f(x + e), dtype=np.float64) - np.asarray(f(x - e), dtype=np.float64)) / (2 * h))
    return np.stack(columns, axis=1)


def directional(f, x: np.ndarray, p: np.ndarray, h: float = 1e-5) -> np.ndarray:
    return (np.asarray(f(x + h * p)) - np.asarray(f(x - h * p))) / (2 * h)


def dense_from_columns(f, n: int) -> np.ndarray:
    """A dense matrix from a matrix-vector product, one unit vector at a time."""
    return np.stack([np.asarray(f(np.eye(n)[i])) for i in range(n)], axis=1)


def _first_leaf(x):
    while isinstance(x, (list, tuple)):
        x = x[0]
    if isinstance(x, dict):
        return _first_leaf(next(iter(x.values())))
    return x
