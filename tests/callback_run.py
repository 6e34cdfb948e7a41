"""The process tests/test_callbacks.py kills and then resumes: ``callback_run.py DIR EVERY first|resume``.

``first`` runs L-BFGS-B on the ill-conditioned line with a ModelCheckpoint every EVERY iterations and a
CSVLogger, each iteration slowed to 50 ms so the killer can land mid-run; ``resume`` resumes from the
checkpoint and prints a JSON line: the resumed counts, its first epoch, the weights and the optimum.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_callbacks import _flat, _ill_conditioned, _line, _recorder  # noqa: E402

from keras_opt_ref import scipy_optimizer  # noqa: E402
from keras_opt_ref.base.keras_compat import default_keras  # noqa: E402


def main(directory: str, every: int, mode: str) -> None:
    keras = default_keras()
    keras.utils.set_random_seed(0)
    X, y, optimum = _ill_conditioned()
    model = _line(keras, X)
    path = os.path.join(directory, "ck.weights.h5")

    class Slow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(0.05)

    rec = _recorder(keras)
    callbacks = [keras.callbacks.ModelCheckpoint(path, save_weights_only=True, save_freq=every),
                 keras.callbacks.CSVLogger(os.path.join(directory, "run.csv" if mode == "first" else "resumed.csv")),
                 rec]
    if mode == "first":
        callbacks.append(Slow())
    resume = {"resume_from": path} if mode == "resume" else {}
    model.train_function = scipy_optimizer.make_train_function(
        model, method="L-BFGS-B", maxiter=2000, gtol=1e-10, ftol=0, callbacks=callbacks, **resume)
    model.fit(X, y, verbose=0)
    result = model.train_function.result
    print(json.dumps({"resumed_from": result.get("resumed_from"), "first_epoch": rec.rows[0][0], "nit": result.nit,
                      "x": _flat(model).tolist(), "optimum": optimum.tolist()}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
