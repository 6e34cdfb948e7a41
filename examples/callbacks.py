"""A scipy run as Keras training: the live progress line, Keras callbacks at every iteration, a
checkpoint to resume from, and a plot of the run's TensorBoard scalars.

    python examples/callbacks.py                  # train, print, write run/ (CSV, TensorBoard, checkpoint)
    python examples/callbacks.py --resume         # resume from run/ck.weights.h5 where the last run left it
    python examples/callbacks.py --plot run.png   # also draw the TensorBoard scalars (needs matplotlib)

Runs on any backend (KERAS_BACKEND=tensorflow, jax, torch) and on tf-keras (TF_USE_LEGACY_KERAS=1);
TensorBoard needs the ``tensorboard`` package (and TensorFlow for its writer).
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from keras_opt_ref import scipy_optimizer
from keras_opt_ref.base.keras_compat import default_keras
from keras_opt_ref.bench.workloads import make_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="run", help="where the CSV log, TensorBoard files and checkpoint go")
    parser.add_argument("--maxiter", type=int, default=300)
    parser.add_argument("--resume", action="store_true", help="resume from DIR/ck.weights.h5")
    parser.add_argument("--plot", help="draw the TensorBoard scalars of the run into this PNG")
    args = parser.parse_args()

    keras = default_keras()
    work = make_workload("mlp", "medium", keras=keras)  # 5,000 rows, a 2-layer tanh MLP
    model, X, y = work.model, work.x, work.y
    os.makedirs(args.dir, exist_ok=True)
    checkpoint = os.path.join(args.dir, "ck.weights.h5")
    callbacks = [
        # Each scipy iteration is one epoch for these callbacks.
        keras.callbacks.EarlyStopping(monitor="loss", patience=20, min_delta=1e-5),
        keras.callbacks.ModelCheckpoint(checkpoint, save_weights_only=True, save_freq=10),  # every 10 iterations
        keras.callbacks.CSVLogger(os.path.join(args.dir, "run.csv"), append=args.resume),
        keras.callbacks.TerminateOnNaN(),
    ]
    if importlib.util.find_spec("tensorboard") and importlib.util.find_spec("tensorflow"):
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(args.dir, "tb")))
    model.train_function = scipy_optimizer.make_train_function(
        model, method="L-BFGS-B", maxiter=args.maxiter, callbacks=callbacks,
        resume_from=checkpoint if args.resume else None,
    )
    model.fit(X, y, batch_size=256, verbose=1)  # verbose=1: the live line, one update per iteration
    result = model.train_function.result
    print(f"{result.message}\nloss {result.fun:.6g} after {result.nit} iterations, {result.nfev} evaluations")
    if args.plot:
        plot(os.path.join(args.dir, "tb"), args.plot)


def plot(logdir: str, path: str) -> None:
    """The per-iteration scalars TensorBoard recorded (``epoch_loss``, ``epoch_grad_norm``), drawn as
    TensorBoard's Scalars tab shows them, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    series: dict[str, dict[int, float]] = {}
    for root, _, files in os.walk(logdir):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    if value.tag in ("epoch_loss", "epoch_grad_norm"):
                        series.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.2))
    panels = list(axes) if len(series) > 1 else [axes]
    for ax, (tag, points) in zip(panels, sorted(series.items(), reverse=True), strict=True):  # loss first
        steps = sorted(points)
        ax.semilogy(steps, [points[s] for s in steps], color="#e8710a")
        ax.set_title(f"{tag} (TensorBoard, train)")
        ax.set_xlabel("scipy iteration (the callbacks' epoch)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
