"""scipy's BLAS threads while a run's framework computes on the same cores.

scipy's solvers call BLAS (OpenBLAS in the wheels) for their own linear algebra. For the methods that
only do vector work on the weights -- dot products, axpys, the few small products of L-BFGS-B's
compact form -- a second BLAS thread buys nothing at these sizes and its spinning competes with the
framework's own thread pools (TensorFlow's, XLA's, torch's), which compute every evaluation between
two scipy steps. Measured on 2 cores (docs/measurements.md, "Threads"): an L-BFGS-B fit of 200
iterations took 0.71-0.77 s with one BLAS thread against 0.92-0.98 s with two (mlp-medium), 1.31-1.40 s
against 1.63-2.62 s (factorization-large). TensorFlow's and XLA's pools are fixed when the framework
starts and are left alone.

``blas_threads`` (an option of ``make_train_function``):

- ``"auto"`` (default): one BLAS thread during the run of a method in :data:`VECTOR_METHODS`; the
  others (dense factorizations: BFGS's inverse Hessian, trust-exact, dogleg, SLSQP, trust-constr,
  least squares' QR) keep the process's setting, where threads do pay;
- ``None``: never touched;
- ``n >= 1``: at most ``n`` threads during any method's run.

The limit holds only inside the run (``threadpoolctl``) and is lifted afterwards, also on errors.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any

from threadpoolctl import threadpool_limits

__all__ = ["AUTO", "VECTOR_METHODS", "blas_limit", "check_blas_threads"]

AUTO = "auto"
# Methods whose own work on the weights is vector operations (plus, for trust-krylov, a small
# tridiagonal problem): one BLAS thread is enough.
VECTOR_METHODS = frozenset({"CG", "L-BFGS-B", "TNC", "Newton-CG", "trust-ncg", "trust-krylov"})


def check_blas_threads(value: Any) -> int | str | None:
    """``blas_threads`` checked: ``"auto"``, ``None`` or a positive int."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"blas_threads must be 'auto', None (leave BLAS alone) or an int >= 1, got {value!r}")
    return int(value)


@contextlib.contextmanager
def blas_limit(method: str, blas_threads: int | str | None) -> Iterator[int | None]:
    """During the block, scipy's BLAS uses at most the threads ``blas_threads`` gives ``method``;
    yields that limit (``None``: untouched)."""
    limit = (1 if method in VECTOR_METHODS else None) if blas_threads == AUTO else blas_threads
    if limit is None:
        yield None
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield limit
