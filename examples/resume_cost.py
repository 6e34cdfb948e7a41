"""What a resume costs: iterations to scipy's stop, uninterrupted against stopped at k and resumed from the
checkpoint written at k (the solver state ``scipy.optimize.minimize`` cannot take back is rebuilt).

    python examples/resume_cost.py      # the table in docs/callbacks.md

The problem is a convex float64 least-squares line with 13 weights (tests/test_callbacks.py's
``_ill_conditioned``), so every run must end at NumPy's least-squares optimum.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_callbacks import _flat, _ill_conditioned, _line, _stop_at  # noqa: E402

from keras_opt_ref import scipy_optimizer  # noqa: E402
from keras_opt_ref.base.keras_compat import default_keras  # noqa: E402

METHODS = [("L-BFGS-B", {"gtol": 1e-10, "ftol": 0}), ("CG", {"gtol": 1e-8}), ("BFGS", {"gtol": 1e-8}),
           ("trust-ncg", {"gtol": 1e-8}), ("Newton-CG", {"xtol": 1e-10})]


def run(keras, X, y, method, options, **kwargs):
    keras.utils.set_random_seed(0)
    model = _line(keras, X)
    model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=3000, **options,
                                                               **kwargs)
    model.fit(X, y, verbose=0)
    return model, model.train_function.result


def main() -> None:
    keras = default_keras()
    warnings.simplefilter("ignore")
    X, y, optimum = _ill_conditioned()
    print("| method | uninterrupted | stopped at 5, resumed | stopped at 20, resumed |\n|---|---|---|---|")
    for method, options in METHODS:
        model, full = run(keras, X, y, method, options)
        cells = [f"{full.nit} (max error {np.max(np.abs(_flat(model) - optimum)):.0e})"]
        for k in (5, 20):
            if k >= full.nit:
                cells.append("(done before)")
                continue
            path = os.path.join(tempfile.mkdtemp(), "ck.weights.h5")
            saver = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
            run(keras, X, y, method, options, callbacks=[saver, _stop_at(keras, k)])
            model, resumed = run(keras, X, y, method, options, resume_from=path)
            cells.append(f"{resumed.nit} (max error {np.max(np.abs(_flat(model) - optimum)):.0e})")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
