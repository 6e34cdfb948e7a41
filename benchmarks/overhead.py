"""Seconds per evaluation of the reference against the floor, round by round.

The floor is one bare compiled TensorFlow value-and-gradient call on the same data with the
variables already set (float64 numpy out, same XLA setting as the objective). Each round
times floor, loss+gradient, HVP and the forward value back to back, so a ratio compares
calls made under the same machine load; we report the median ratio with its min-max.

Run: ``python benchmarks/overhead.py [--rounds 30]`` (``TF_USE_LEGACY_KERAS=1`` for tf-keras).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_opt_ref import FullBatchObjective, _keras, workloads  # noqa: E402


def _floor(model, objective):
    tf_vars = [_keras.tf_variable(v) for v in model.trainable_variables]
    x, y, sw = objective.data

    @tf.function(jit_compile=objective.jit_compile)
    def value_and_grad():
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=False), sample_weight=sw)
        grads = tape.gradient(loss, tf_vars)
        return tf.cast(loss, tf.float64), tf.concat(
            [tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float64), [-1]) for g in grads], 0
        )

    def call():
        f, g = value_and_grad()
        return float(f), g.numpy()

    return call


def _timed(fn, repeat=5):
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name, model, x, y, rounds, jit_compile=None):
    model.compile(loss="mse")
    objective = FullBatchObjective(model, x, y, jit_compile=jit_compile)
    floor = _floor(model, objective)
    rng = np.random.default_rng(0)
    x0 = objective.flat.read()
    points = [x0 + 0.01 * rng.normal(size=x0.size) for _ in range(rounds * 10 + 10)]
    p = rng.normal(size=x0.size)
    counter = iter(range(len(points)))
    floor(), objective.value_and_grad(points[0]), objective.hessp(points[0], p), objective.value(points[1])  # warm up
    rows = []
    for _ in range(rounds):
        t_floor = _timed(floor)
        t_grad = _timed(lambda: objective.value_and_grad(points[next(counter)]))  # fresh x: no memo hit
        t_hvp = _timed(lambda: objective.hessp(x0, p))
        rows.append((t_floor, t_grad, t_hvp))
    rows = np.array(rows)
    ratio_grad = rows[:, 1] / rows[:, 0]
    ratio_hvp = rows[:, 2] / rows[:, 1]

    def fmt(values, scale=1.0, unit=""):
        return f"{np.median(values) * scale:.3g}{unit} [{values.min() * scale:.3g}-{values.max() * scale:.3g}]"

    print(
        f"{name:<26} n={objective.size:<6} xla={objective.jit_compile!s:<5} "
        f"floor {fmt(rows[:, 0], 1e3, ' ms')}  loss+grad {fmt(rows[:, 1], 1e3, ' ms')}  "
        f"loss+grad/floor {fmt(ratio_grad)}  HVP {fmt(rows[:, 2], 1e3, ' ms')}  HVP/grad {fmt(ratio_hvp)}"
    )
    assert objective.traces["value_and_grad"] == 1 and objective.traces["hvp"] == 1, objective.traces


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--jit", action="store_true", help="XLA for objective and floor (default: the model's)")
    args = parser.parse_args()
    keras = _keras.default_keras()
    print(
        f"{keras.__name__} {keras.__version__}, tensorflow {tf.__version__}, "
        f"medians [min-max] over {args.rounds} rounds"
    )
    X, y = workloads.regression_data(*workloads.MLP_SIZES["medium"], nonlinear=True)
    jit = True if args.jit else None
    measure("MLP 5000x8-64-32-1", workloads.mlp_model(keras), X, y, args.rounds, jit)
    data = workloads.factorization_data(*workloads.FACTORIZATION_SIZES["medium"])
    measure(
        "factorization 2000x1000/40k",
        workloads.factorization_model(keras, data.n_users, data.n_items),
        data.x,
        data.ratings,
        args.rounds,
        jit,
    )


if __name__ == "__main__":
    main()
