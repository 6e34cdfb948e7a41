"""A physics-informed network for the 2-D Poisson equation, trained the usual way: Adam, then L-BFGS-B on the
full set of collocation points through keras_opt_ref. Prints the relative L2 error against the exact
solution after each phase; ``--plot`` draws the solution, the exact one and the error.

    python examples/pinn_poisson.py               # about 20 s on 2 CPU cores; relative L2 error about 2e-3
    python examples/pinn_poisson.py --plot pinn.png
    python examples/pinn_poisson.py --size medium --maxiter 1000   # 2,048 points: about 1 min

The problem (keras_opt_ref.bench.pinn, ``poisson2d``): ``-(u_xx + u_yy) = 2 pi^2 sin(pi x) sin(pi y)`` on the
unit square, ``u = 0`` on its boundary; exact ``u = sin(pi x) sin(pi y)``. The model's ``compute_loss``
takes the Laplacian of the network with respect to its inputs (tf.GradientTape), so the TensorFlow backend
(Keras 3 or tf-keras) runs it.
"""

from __future__ import annotations

import argparse
import time

from keras_opt_ref import scipy_optimizer
from keras_opt_ref.base.keras_compat import default_keras
from keras_opt_ref.bench import pinn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=tuple(pinn.PINN_SIZES["poisson2d"]))
    parser.add_argument("--adam-epochs", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--maxiter", type=int, default=2000, help="L-BFGS-B iterations")
    parser.add_argument("--plot", help="draw the solution, the exact one and the error into this PNG")
    args = parser.parse_args()

    keras = default_keras()
    work = pinn.make_pinn("poisson2d", args.size, keras=keras)
    model, X, y = work.model, work.x, work.y
    print(f"poisson2d-{args.size}: {len(X)} collocation points, {model.count_params()} weights; "
          f"relative L2 error at the start {pinn.relative_l2_error(work):.3e}")

    start = time.perf_counter()
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss="mse")  # compute_loss is the PDE's
    model.fit(X, y, batch_size=len(X), epochs=args.adam_epochs, verbose=0)
    print(f"Adam, {args.adam_epochs} full-batch steps: relative L2 error {pinn.relative_l2_error(work):.3e} "
          f"({time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    model.train_function = scipy_optimizer.make_train_function(model, method="L-BFGS-B", maxiter=args.maxiter)
    model.fit(X, y, batch_size=len(X), verbose=1)
    result = model.train_function.result
    print(f"then L-BFGS-B, {result.nit} iterations: relative L2 error {pinn.relative_l2_error(work):.3e} "
          f"({time.perf_counter() - start:.1f} s; loss {result.fun:.3e}; {result.message})")
    if args.plot:
        plot(work, args.plot)


def plot(work: pinn.Pinn, path: str, points: int = 101) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    axis = np.linspace(0.0, 1.0, points)
    gx, gy = np.meshgrid(axis, axis, indexing="ij")
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    u = np.asarray(work.model.predict_on_batch(grid), dtype=np.float64).reshape(points, points)
    exact = pinn.exact_solution(work.name, grid).reshape(points, points)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, field) in zip(axes, [("PINN u(x, y)", u), ("exact sin(pi x) sin(pi y)", exact),
                                          ("u - exact", u - exact)], strict=True):
        image = ax.pcolormesh(gx, gy, field, shading="auto", cmap="RdBu_r" if title == "u - exact" else "viridis")
        ax.set_title(title)
        ax.set_aspect("equal")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
