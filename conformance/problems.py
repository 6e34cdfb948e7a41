"""Problems the suite poses: small models and data built here, independent of any implementation."""

from __future__ import annotations

import numpy as np

# The methods of scipy.optimize.minimize and what each uses, from scipy's documentation.
METHODS = (
    "Nelder-Mead", "Powell", "CG", "BFGS", "Newton-CG", "L-BFGS-B", "TNC", "COBYLA", "COBYQA",
    "SLSQP", "trust-constr", "dogleg", "trust-ncg", "trust-exact", "trust-krylov",
)
GRADIENT_FREE = {"Nelder-Mead", "Powell", "COBYLA", "COBYQA"}
NEEDS_HESSIAN = {"Newton-CG", "dogleg", "trust-ncg", "trust-exact", "trust-krylov"}  # hess or hessp required
USES_HESSIAN = NEEDS_HESSIAN | {"trust-constr"}
TAKES_BOUNDS = {"Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr"}


def regression(n=50, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.tanh(X @ rng.normal(size=(d, 1))) + 0.1 * rng.normal(size=(n, 1))
    return X, y


def mlp(keras, d=3, hidden=4, l2=0.0):
    reg = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential([
        keras.Input((d,)),
        keras.layers.Dense(hidden, activation="tanh", kernel_regularizer=reg),
        keras.layers.Dense(1),
    ])


def linear_problem(n=40, d=3, seed=1):
    """Linear least squares with a bias and its closed-form optimum (numpy lstsq)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=(d, 1)) + 0.5 + 0.3 * rng.normal(size=(n, 1))
    A = np.hstack([X, np.ones((n, 1))])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    optimum = float(np.mean((A @ coef - y) ** 2))
    return X, y, coef.ravel(), optimum


def embedding_model(keras, with_dense=True, rows=6, width=3):
    ids = keras.Input((2,), dtype="int32")
    emb = keras.layers.Flatten()(keras.layers.Embedding(rows, width)(ids))
    head = keras.layers.Dense(1, trainable=with_dense, kernel_initializer="ones")
    return keras.Model(ids, head(keras.layers.Activation("tanh")(emb)))


def embedding_data(n=40, rows=6, seed=4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, rows, size=(n, 2)).astype("int32")  # every id repeats
    return ids, rng.normal(size=(n, 1))


def fit(impl, model, x, y=None, *, method="L-BFGS-B", maxiter=3, epochs=1, make_kwargs=None, **fit_kwargs):
    model.train_function = impl.make_train_function(model, method=method, maxiter=maxiter, **(make_kwargs or {}))
    return model.fit(x, y, epochs=epochs, verbose=0, **fit_kwargs)
