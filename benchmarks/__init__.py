"""asv and pytest-benchmark suites; the measurements live in keras_opt_ref.bench."""

import os

# Before any benchmark module imports keras_opt_ref (and so TensorFlow): asv imports this package first.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
