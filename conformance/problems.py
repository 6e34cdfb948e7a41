"""Problems the suite poses: small models and data built here, independent of any implementation.

Builders take the Keras module under test (``keras`` or ``tf_keras``), so one problem
serves both flavours. Custom layers are defined per call for the same reason.
"""

from __future__ import annotations

import numpy as np

# The methods of scipy.optimize.minimize and what each uses, from scipy's documentation.
METHODS = (
    "Nelder-Mead", "Powell", "CG", "BFGS", "Newton-CG", "L-BFGS-B", "TNC", "COBYLA", "COBYQA",
    "SLSQP", "trust-constr", "dogleg", "trust-ncg", "trust-exact", "trust-krylov",
)
GRADIENT_FREE = {"Nelder-Mead", "Powell", "COBYLA", "COBYQA"}
HESSP_METHODS = ("Newton-CG", "trust-ncg", "trust-krylov")  # take hessp (or hess); trust-constr may too
HESS_METHODS = ("dogleg", "trust-exact")  # need the dense Hessian
NEEDS_HESSIAN = set(HESSP_METHODS) | set(HESS_METHODS)  # hess or hessp required
USES_HESSIAN = NEEDS_HESSIAN | {"trust-constr"}
TAKES_BOUNDS = {"Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr"}
LEAST_SQUARES = ("lm", "trf", "dogbox")


def regression(n=50, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.tanh(X @ rng.normal(size=(d, 1))) + 0.1 * rng.normal(size=(n, 1))
    return X, y


def mlp(keras, d=3, hidden=4, l2=0.0):
    """A small non-convex model (tanh): Gauss-Newton or any other approximation is not its Hessian."""
    reg = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential([
        keras.Input((d,)),
        keras.layers.Dense(hidden, activation="tanh", kernel_regularizer=reg),
        keras.layers.Dense(1),
    ])


def linear(keras, d=3, **dense_kwargs):
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, **dense_kwargs)])
    model.compile(loss="mse")
    return model


def linear_problem(n=40, d=3, seed=1):
    """Linear least squares with a bias and its closed-form optimum (numpy lstsq)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=(d, 1)) + 0.5 + 0.3 * rng.normal(size=(n, 1))
    A = np.hstack([X, np.ones((n, 1))])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    optimum = float(np.mean((A @ coef - y) ** 2))
    return X, y, coef.ravel(), optimum


def nonneg_problem(n=40, seed=2):
    """y = X @ [1, -2, 0.5]: the unconstrained optimum has a negative weight; NonNeg's optimum (lstsq on
    the non-negative orthant) does not."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = X @ np.array([[1.0], [-2.0], [0.5]]) + 0.05 * rng.normal(size=(n, 1))
    return X, y


def conv_model(keras, rank=2):
    """Weights of rank 3 (Conv1D kernel) or 4 (Conv2D kernel): the flat vector must hold them in C order too."""
    if rank == 1:
        body = [keras.Input((8, 2)), keras.layers.Conv1D(3, 3, activation="tanh")]
    else:
        body = [keras.Input((5, 5, 1)), keras.layers.Conv2D(2, 3, activation="tanh")]
    return keras.Sequential([*body, keras.layers.Flatten(), keras.layers.Dense(1)])


def conv_data(rank=2, n=30, seed=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8, 2) if rank == 1 else (n, 5, 5, 1))
    return X, np.tanh(X.reshape(n, -1).sum(axis=1, keepdims=True) / 4) + 0.1 * rng.normal(size=(n, 1))


def dropout_model(keras, rate=0.5):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dropout(rate),
                              keras.layers.Dense(1)])
    model.compile(loss="mse")
    return model


def embedding_model(keras, with_dense=True, rows=6, width=3):
    ids = keras.Input((2,), dtype="int32")
    emb = keras.layers.Flatten()(keras.layers.Embedding(rows, width)(ids))
    head = keras.layers.Dense(1, trainable=with_dense, kernel_initializer="ones")
    return keras.Model(ids, head(keras.layers.Activation("tanh")(emb)))


def embedding_data(n=40, rows=6, seed=4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, rows, size=(n, 2)).astype("int32")  # every id repeats
    return ids, rng.normal(size=(n, 1))


def classification(n=48, seed=6):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X @ np.array([1.0, -1.0, 0.5]) + 0.3 * rng.normal(size=n) > 0.4).astype("float64").reshape(-1, 1)
    return X, y


def training_mode_model(keras, shift=0.75):
    """A layer that adds ``shift`` in training mode only: the objective must run in inference mode."""

    class ShiftWhenTraining(keras.layers.Layer):
        def call(self, inputs, training=None):
            return inputs + shift if training else inputs

    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), ShiftWhenTraining(),
                             keras.layers.Dense(1)])


def add_loss_model(keras, strength=0.05):
    """A layer that adds ``strength * sum(kernel**2)`` through ``add_loss`` (not a kernel_regularizer)."""
    ops = _ops(keras)

    class PenalizedDense(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(int(input_shape[-1]), 1), initializer="glorot_uniform", name="kernel")

        def call(self, inputs):
            self.add_loss(strength * ops.sum(ops.square(self.kernel)))
            return ops.matmul(inputs, self.kernel)

    layer = PenalizedDense()
    model = keras.Sequential([keras.Input((3,)), layer])
    return model, lambda: strength * float(np.sum(np.square(np.asarray(layer.kernel.numpy(), dtype=np.float64))))


def nan_region_model(keras, radius=1.5):
    """A linear model whose output is NaN once sum(|w|) passes ``radius``; the optimum lies beyond it,
    so a minimizer runs into NaN losses and must keep the best finite point."""
    ops = _ops(keras)

    class Guarded(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(int(input_shape[-1]), 1), initializer="zeros", name="kernel")

        def call(self, inputs):
            guard = ops.log(radius - ops.sum(ops.abs(self.kernel)))  # NaN outside the radius
            return ops.matmul(inputs, self.kernel) + 0.0 * guard

    return keras.Sequential([keras.Input((3,)), Guarded()])


def _ops(keras):
    """Backend-neutral math for custom layers: keras.ops (Keras 3) or TensorFlow (tf-keras)."""
    ops = getattr(keras, "ops", None)
    if ops is not None:
        return ops
    import tensorflow as tf

    class _TF:
        sum = staticmethod(tf.reduce_sum)
        square = staticmethod(tf.square)
        abs = staticmethod(tf.abs)
        log = staticmethod(tf.math.log)
        matmul = staticmethod(tf.matmul)

    return _TF


def sequence(keras, X, y, batch):
    """The data as a keras.utils.PyDataset (tf-keras: Sequence) of batches."""
    base = getattr(keras.utils, "PyDataset", None) or keras.utils.Sequence

    class Batches(base):
        def __len__(self):
            return -(-len(X) // batch)

        def __getitem__(self, i):
            return X[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]

    return Batches()
