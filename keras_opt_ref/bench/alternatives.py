"""Full-batch L-BFGS as users would otherwise run it: the contenders of the time-to-target comparison.

Each contender minimizes a workload's loss -- the same math as the Keras model, from
:mod:`.same_math` -- with another library's L-BFGS, from the workload's initial weights:

- ``"tfp"``: ``tfp.optimizer.lbfgs_minimize`` in one XLA-compiled ``tf.function`` (the whole
  loop in the graph), on the TensorFlow same math.
- ``"jaxopt"``: ``jaxopt.LBFGS`` (zoom line search), the whole run under ``jax.jit``, on the JAX
  same math.
- ``"optimistix"``: ``optimistix.LBFGS`` (backtracking Armijo line search), stepped in a jitted
  ``lax.while_loop`` so that the limit counts iterations (see :class:`OptimistixLbfgs`), on the
  JAX same math.
- ``"torch"``: ``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` on the same math written on one
  flat float32 torch tensor.

Each is optional: :func:`skip_reason` says which package is missing. All get the same iteration
limit and scipy L-BFGS-B's default tolerances where the library has a like one (:data:`GTOL` on
the gradient's largest component: tfp, torch; on its 2-norm: jaxopt; :data:`FTOL` on the change of
the loss: tfp, optimistix's Cauchy test on the loss and the weights), and otherwise their
libraries' defaults (tfp and jaxopt keep 10 correction pairs, optimistix 10, torch 100; torch's
evaluation limit is raised to scipy's ``maxfun`` so that the iteration limit binds).

``run(target)`` with a finite ``target`` makes the loss report a zero gradient wherever it is at or
below the target (``stop_gradient``), so that the solver stops there by its own convergence test
(optimistix: its loop stops there): the time of that run is the time to the target, with nothing
recorded inside compiled loops. Measured on this 2-core machine, optimistix's L-BFGS with these
settings stalls on the factorization (0.99 -> 0.98 in 200 iterations).
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from ..backends.tensorflow.flat import GraphFlatVariables as FlatVariables
from . import same_math
from .workloads import Workload

__all__ = ["CONTENDERS", "FTOL", "GTOL", "Contender", "ContenderRun", "make_contender", "skip_reason"]

CONTENDERS = ("tfp", "jaxopt", "optimistix", "torch")
GTOL = 1e-5  # scipy L-BFGS-B's default gtol
FTOL = 2.220446049250313e-09  # scipy L-BFGS-B's default ftol
MAXFUN = 15000  # scipy L-BFGS-B's default maxfun; torch's own default (1.25 maxiter) would bind first
_PACKAGES = {"tfp": ("tensorflow_probability",), "jaxopt": ("jax", "jaxopt"), "optimistix": ("jax", "optimistix"),
             "torch": ("torch",)}


def skip_reason(name: str) -> str | None:
    """Why contender ``name`` cannot run here (a package is missing), or None."""
    if name not in CONTENDERS:
        raise ValueError(f"Unknown contender {name!r}; choose one of {CONTENDERS}")
    for package in _PACKAGES[name]:
        try:
            importlib.import_module(package)
        except ImportError as exc:
            return f"{package} is not installed: {exc}"
    return None


@dataclass
class ContenderRun:
    """One run: wall seconds of the whole call, counts as the library reports them, the final loss
    (in the library's float32), and the final weights as a float64 vector in the model's layout."""

    name: str
    seconds: float
    nit: int
    nfev: int
    loss: float
    message: str
    x: np.ndarray = field(repr=False)


class Contender:
    """A compiled L-BFGS run of one library on one workload, from the workload's initial weights.

    The first :meth:`run` includes tracing and compilation; later ones reuse them.
    """

    name: str

    def __init__(self, workload: Workload, maxiter: int) -> None:
        self.workload, self.maxiter = workload, int(maxiter)
        self.x0 = FlatVariables.from_variables(workload.model.trainable_variables).read()

    def run(self, target: float = -math.inf) -> ContenderRun:
        start = time.perf_counter()
        x, loss, nit, nfev, message = self._run(float(target))
        seconds = time.perf_counter() - start
        return ContenderRun(self.name, seconds, int(nit), int(nfev), float(loss), message,
                            np.asarray(x, dtype=np.float64))

    def _run(self, target: float) -> tuple[Any, float, int, int, str]:
        raise NotImplementedError


class TfpLbfgs(Contender):
    name = "tfp"

    def __init__(self, workload: Workload, maxiter: int) -> None:
        super().__init__(workload, maxiter)
        import tensorflow_probability as tfp

        math_ = same_math.same_math(workload, "tensorflow")
        self.dtype = math_.dtype

        def value_and_grad(v, target):
            with tf.GradientTape() as tape:
                tape.watch(v)
                f = math_.loss(v)
                f = tf.where(f <= target, tf.stop_gradient(f), f)
            return f, tape.gradient(f, v)

        @tf.function(jit_compile=True)  # measured: 0.6-0.75x the time of a graph loop around an XLA objective
        def minimize(x0, target):
            r = tfp.optimizer.lbfgs_minimize(
                lambda v: value_and_grad(v, target), x0, tolerance=GTOL, f_relative_tolerance=FTOL,
                max_iterations=self.maxiter,
            )
            return r.position, r.objective_value, r.num_iterations, r.num_objective_evaluations, r.converged, r.failed

        self._minimize = minimize

    def _run(self, target):
        x, f, nit, nfev, converged, failed = self._minimize(tf.constant(self.x0, self.dtype),
                                                            tf.constant(target, self.dtype))
        message = "converged" if converged else "line search failed" if failed else "iteration limit"
        return x.numpy(), f.numpy(), nit.numpy(), nfev.numpy(), message


class _JaxContender(Contender):
    """The JAX same math, with the zero-gradient stop at the target."""

    def __init__(self, workload: Workload, maxiter: int) -> None:
        super().__init__(workload, maxiter)
        import jax
        import jax.numpy as jnp

        self.math = math_ = same_math.same_math(workload, "jax")
        self.jax, self.jnp = jax, jnp

        def loss(v, target, data):
            f = math_.loss(v, data)
            return jnp.where(f <= target, jax.lax.stop_gradient(f), f)

        self.loss = loss

    def _run(self, target):
        x0 = self.x0.astype(self.math.dtype)
        out = self._minimize(x0, self.jnp.asarray(target, self.math.dtype), self.math.data)
        x, f, nit, nfev, message = self.jax.device_get(out)
        return x, f, nit, nfev, self._message(message)

    def _message(self, code) -> str:
        return str(code)


class JaxoptLbfgs(_JaxContender):
    name = "jaxopt"

    def __init__(self, workload: Workload, maxiter: int) -> None:
        super().__init__(workload, maxiter)
        import jaxopt

        solver = jaxopt.LBFGS(fun=self.jax.value_and_grad(self.loss), value_and_grad=True, maxiter=self.maxiter,
                              tol=GTOL)

        def minimize(x0, target, data):
            x, state = solver.run(x0, target, data)
            return x, state.value, state.iter_num, state.num_fun_eval, state.error <= GTOL

        self._minimize = self.jax.jit(minimize)

    def _message(self, converged) -> str:
        return "converged" if converged else "iteration limit"


class OptimistixLbfgs(_JaxContender):
    """``optimistix.LBFGS`` stepped by a ``lax.while_loop`` of its own ``init``/``step``/``terminate``:
    ``optimistix.minimise``'s ``max_steps`` counts evaluations (line-search trials too), not
    iterations; this loop stops at the iteration limit (accepted steps), at optimistix's own test,
    or, with a target, at the first accepted step at or below it (optimistix has no gradient test
    for the zero-gradient stop, and its L-BFGS update turns a zero step into NaN)."""

    name = "optimistix"

    def __init__(self, workload: Workload, maxiter: int) -> None:
        super().__init__(workload, maxiter)
        import equinox as eqx
        import optimistix as optx

        jax, jnp = self.jax, self.jnp
        solver = optx.LBFGS(rtol=FTOL, atol=FTOL)
        loss = self.math.loss

        def fn(v, data):
            return loss(v, data), None

        def minimize(x0, target, data):
            state = solver.init(fn, x0, data, {}, jax.ShapeDtypeStruct((), x0.dtype), None, frozenset())
            # The state holds functions beside arrays: only its arrays ride in the loop (as optimistix does).
            arrays, static = eqx.partition(state, eqx.is_array)

            def going(carry):
                y, arrays, evaluations = carry
                state = eqx.combine(arrays, static)
                done, _ = solver.terminate(fn, y, data, {}, state, frozenset())
                above = state.first_step | (state.f_info.f > target)
                return ~done & above & (state.num_accepted_steps < self.maxiter) & (evaluations < MAXFUN)

            def step(carry):
                y, arrays, evaluations = carry
                y, state, _ = solver.step(fn, y, data, {}, eqx.combine(arrays, static), frozenset())
                return y, eqx.partition(state, eqx.is_array)[0], evaluations + 1

            y, arrays, evaluations = jax.lax.while_loop(going, step, (x0, arrays, jnp.array(0)))
            state = eqx.combine(arrays, static)
            done, _ = solver.terminate(fn, y, data, {}, state, frozenset())
            return y, loss(y, data), state.num_accepted_steps, evaluations, done

        self._minimize = jax.jit(minimize)

    def _message(self, done) -> str:
        return "converged (Cauchy test)" if done else "iteration limit or target"


class TorchLbfgs(Contender):
    name = "torch"

    def __init__(self, workload: Workload, maxiter: int) -> None:
        super().__init__(workload, maxiter)
        import torch

        self.torch = torch
        math_ = same_math.same_math(workload, "torch")
        self.dtype = torch.float64 if math_.dtype == np.float64 else torch.float32
        self.loss = math_.loss

    def _run(self, target):
        torch = self.torch
        v = torch.tensor(self.x0, dtype=self.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([v], lr=1, max_iter=self.maxiter, max_eval=MAXFUN, tolerance_grad=GTOL,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            f = self.loss(v)
            f.backward()
            if f.item() <= target:
                v.grad.zero_()  # the zero-gradient stop, as the other contenders' stop_gradient
            return f

        opt.step(closure)
        with torch.no_grad():
            f = float(self.loss(v))
        state = opt.state[v]
        return v.detach().numpy(), f, state["n_iter"], state["func_evals"], "stopped (torch reports no reason)"


_CLASSES = {c.name: c for c in (TfpLbfgs, JaxoptLbfgs, OptimistixLbfgs, TorchLbfgs)}


def make_contender(name: str, workload: Workload, maxiter: int = 200) -> Contender:
    """Contender ``name`` (one of :data:`CONTENDERS`) on ``workload``; ``ImportError`` if its package is missing."""
    reason = skip_reason(name)
    if reason:
        raise ImportError(reason)
    return _CLASSES[name](workload, maxiter)
