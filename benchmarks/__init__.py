"""asv and pytest-benchmark suites; the measurements live in keras_opt_ref.bench."""
