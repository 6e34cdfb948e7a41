"""Settings shared by the asv and pytest-benchmark suites."""

from __future__ import annotations

import os

# Seconds of Adam per configuration for the time-to-target benchmark. CI shortens it
# (KERAS_OPT_BENCH_ADAM_SECONDS=3) so that every benchmark still runs once, untimed.
ADAM_SECONDS = float(os.environ.get("KERAS_OPT_BENCH_ADAM_SECONDS", "60"))
# Iteration limit of the per-run benchmarks (CI: a few, so that each still runs once quickly).
RUN_MAXITER = int(os.environ.get("KERAS_OPT_BENCH_MAXITER", "200"))
WORKLOADS = ("linear", "mlp", "factorization")
SIZES = ("small", "medium", "large")
