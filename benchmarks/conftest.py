"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only`` (CI: ``--benchmark-disable``)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
