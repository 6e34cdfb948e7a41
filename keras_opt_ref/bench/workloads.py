"""The workloads: one definition for the CLI, tests, conformance suite and benchmarks.

Everything is generated on the fly from fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FACTORIZATION_SIZES",
    "MLP_SIZES",
    "LINEAR_SIZES",
    "SIZES",
    "WORKLOADS",
    "FactorizationData",
    "Workload",
    "checked_choice",
    "factorization_data",
    "factorization_model",
    "linear_model",
    "make_workload",
    "mlp_model",
    "readme_regression",
    "regression_data",
]

README_WEIGHTS = np.array([1.0, 2.0, 3.0, 4.0])

# (samples, features) for regression; (users, items, ratings) for factorization.
LINEAR_SIZES = {"small": (1000, 100), "medium": (10000, 100), "large": (100000, 100)}
MLP_SIZES = {"small": (500, 8), "medium": (5000, 8), "large": (50000, 8)}
FACTORIZATION_SIZES = {
    "tiny": (200, 100, 1000),
    "small": (500, 250, 5000),
    "medium": (2000, 1000, 40000),  # 2% observed
    "large": (6000, 4000, 480000),  # 12x the medium ratings, 2% observed
}
WORKLOADS = ("linear", "mlp", "factorization")
SIZES = {"linear": LINEAR_SIZES, "mlp": MLP_SIZES, "factorization": FACTORIZATION_SIZES}


def readme_regression() -> tuple[np.ndarray, np.ndarray]:
    """The README example: X uniform 10x4 (seed 42), y = X @ [1, 2, 3, 4]."""
    X = np.random.default_rng(42).uniform(size=(10, 4))
    return X, X @ README_WEIGHTS


def regression_data(n: int, d: int, *, seed: int = 0, noise: float = 0.1, nonlinear: bool = False):
    """Regression data: linear ``X @ w + noise``, or a smooth nonlinear target for the MLP."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    if nonlinear:
        y = np.sin(X[:, :1] * 1.5) + 0.5 * np.tanh(X[:, 1:2] * X[:, 2:3]) + 0.1 * X[:, 3:4] ** 2
    else:
        w = rng.normal(size=(d, 1))
        y = X @ w
    y = y + noise * rng.normal(size=y.shape)
    return X, y.astype(np.float32)


def linear_model(keras: Any, n_features: int, *, use_bias: bool = True, dtype: str | None = None):
    return keras.Sequential(
        [keras.Input((n_features,), dtype=dtype), keras.layers.Dense(1, use_bias=use_bias, dtype=dtype)]
    )


def mlp_model(keras: Any, n_features: int = 8, *, dtype: str | None = None, seed: int = 0):
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential(
        [
            keras.Input((n_features,), dtype=dtype),
            keras.layers.Dense(64, activation="tanh", kernel_initializer=init, dtype=dtype),
            keras.layers.Dense(32, activation="tanh", kernel_initializer=init, dtype=dtype),
            keras.layers.Dense(1, kernel_initializer=init, dtype=dtype),
        ]
    )


@dataclass(frozen=True)
class FactorizationData:
    users: np.ndarray  # (n_ratings, 1) int32
    items: np.ndarray  # (n_ratings, 1) int32
    ratings: np.ndarray  # (n_ratings, 1) float32
    n_users: int
    n_items: int

    @property
    def x(self) -> list[np.ndarray]:
        return [self.users, self.items]


def factorization_data(
    n_users: int, n_items: int, n_ratings: int, *, rank: int = 4, noise: float = 0.05, seed: int = 0
) -> FactorizationData:
    """Observed entries of a low-rank users x items matrix plus Gaussian noise (no repeats)."""
    rng = np.random.default_rng(seed)
    if n_ratings > n_users * n_items:
        raise ValueError("more ratings than matrix entries")
    chosen = np.unique(rng.integers(0, n_users * n_items, size=int(n_ratings * 1.2) + 16))
    while chosen.size < n_ratings:
        more = rng.integers(0, n_users * n_items, size=n_ratings)
        chosen = np.unique(np.concatenate([chosen, more]))
    chosen = rng.permutation(chosen)[:n_ratings]
    users, items = np.divmod(chosen, n_items)
    U = rng.normal(size=(n_users, rank)) / rank**0.25
    V = rng.normal(size=(n_items, rank)) / rank**0.25
    ratings = np.sum(U[users] * V[items], axis=1) + noise * rng.normal(size=n_ratings)
    return FactorizationData(
        users=users.astype(np.int32)[:, None],
        items=items.astype(np.int32)[:, None],
        ratings=ratings.astype(np.float32)[:, None],
        n_users=n_users,
        n_items=n_items,
    )


def factorization_model(
    keras: Any, n_users: int, n_items: int, *, width: int = 16, bias: bool = False,
    dtype: str | None = None, seed: int = 0,
):
    """Two Embedding tables; prediction = dot product of the looked-up rows (+ biases)."""
    init = keras.initializers.RandomNormal(stddev=0.1, seed=seed)
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    def lookup(ids, rows, width, initializer):
        table = keras.layers.Embedding(rows, width, embeddings_initializer=initializer, dtype=dtype)
        return keras.layers.Flatten()(table(ids))

    u, v = lookup(user, n_users, width, init), lookup(item, n_items, width, init)
    out = keras.layers.Dot(axes=1, dtype=dtype)([u, v])
    if bias:
        out = keras.layers.Add(dtype=dtype)([out, lookup(user, n_users, 1, "zeros"), lookup(item, n_items, 1, "zeros")])
    return keras.Model([user, item], out)


@dataclass(frozen=True)
class Workload:
    """A compiled model (loss ``"mse"``) and its whole training set."""

    name: str
    size: str
    model: Any
    x: Any
    y: np.ndarray
    factorization: FactorizationData | None = None

    @property
    def num_samples(self) -> int:
        return int(self.y.shape[0])

    @property
    def label(self) -> str:
        return f"{self.name}-{self.size}"


def checked_choice(sizes: dict[str, dict[str, Any]], name: str, size: str, what: str, keras: Any) -> Any:
    """Refuse an unknown ``name`` or ``size`` of the table ``sizes``, naming the choices; the Keras to build
    with (``keras``, or the default one)."""
    if name not in sizes:
        raise ValueError(f"Unknown {what} {name!r}; choose one of {tuple(sizes)}")
    if size not in sizes[name]:
        raise ValueError(f"Unknown size {size!r} for {name}; choose one of {tuple(sizes[name])}")
    if keras is None:
        from ..base.keras_compat import default_keras

        keras = default_keras()
    return keras


def make_workload(
    name: str, size: str = "medium", *, keras: Any = None, dtype: str | None = None, bias: bool = False
) -> Workload:
    """Build workload ``name`` (one of ``WORKLOADS``) at ``size`` (a key of ``SIZES[name]``).

    Deterministic: the same name and size always give the same data and initial weights.
    ``bias`` adds the per-user and per-item bias terms to the factorization model.
    """
    keras = checked_choice(SIZES, name, size, "workload", keras)
    keras.utils.set_random_seed(0)
    factorization = None
    if name == "factorization":
        factorization = factorization_data(*SIZES[name][size])
        x, y = factorization.x, factorization.ratings
        model = factorization_model(keras, factorization.n_users, factorization.n_items, bias=bias, dtype=dtype)
    else:
        n, d = SIZES[name][size]
        x, y = regression_data(n, d, nonlinear=name == "mlp")
        model = linear_model(keras, d, dtype=dtype) if name == "linear" else mlp_model(keras, d, dtype=dtype)
    model.compile(loss="mse")
    return Workload(name, size, model, x, y, factorization)
