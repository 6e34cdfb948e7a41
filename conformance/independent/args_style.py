"""args_style: module-level objective functions handed to scipy with ``args=(model, batches, state)``.

Style: procedural. ``loss_and_grad(x, model, batches, state)``, ``loss_only``, ``hessian_vector``
and ``hessian_matrix`` are plain module-level functions; the train function calls
``scipy.optimize.minimize(fun, x0, args=(model, batches, state), jac=True, hessp=..., hess=...,
method=..., options=...)``. The batches are kept exactly as ``fit`` produced them and every
evaluation loops over them with a ``tf.GradientTape`` per batch (per-batch work is a cached
``tf.function``).

BUG (deliberate): the objective, its gradient, Hessian-vector products and Hessian are the MEAN OF
THE PER-BATCH MEAN LOSSES over the batches fit produced (the old keras-opt bug), instead of the loss
over the whole data set. It is wrong whenever the batches are uneven (e.g. 50 rows in batches of
16 -> 16, 16, 16, 2) or weighted differently; with one batch (or equal batches and no sample weights)
it is right. The history ``loss`` is this same objective at the final weights; metrics are correct.

Supports: the 15 minimize methods (case-insensitive) with exactly their derivatives, bounds=(lo, hi)
and NonNeg for the bounded methods, history with metrics and nit/nfev/njev/nhev (one combined call
with jac=True counts as one fun call and one gradient call), best finite point on NaN/Inf/exception,
all refusals, Keras 3 (tf-keras works for the same calls). Refuses lm/trf/dogbox ("not supported").
"""

import inspect
import warnings

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

METHODS = ("Nelder-Mead", "Powell", "CG", "BFGS", "Newton-CG", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP",
           "trust-constr", "dogleg", "trust-ncg", "trust-exact", "trust-krylov")
GRADIENT_FREE = ("nelder-mead", "powell", "cobyla", "cobyqa")
WITH_HESSP = ("newton-cg", "trust-ncg", "trust-krylov", "trust-constr")
WITH_HESS = ("dogleg", "trust-exact")
BOUNDED = ("Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")
SOLVER_OPTIONS = {
    "nelder-mead": "maxiter maxfev disp return_all initial_simplex xatol fatol adaptive",
    "powell": "xtol ftol maxiter maxfev disp direc return_all",
    "cg": "gtol norm eps maxiter disp return_all finite_diff_rel_step c1 c2 workers",
    "bfgs": "gtol norm eps maxiter disp return_all finite_diff_rel_step xrtol c1 c2 hess_inv0 workers",
    "newton-cg": "xtol eps maxiter disp return_all c1 c2 workers",
    "l-bfgs-b": "maxcor ftol gtol eps maxfun maxiter maxls finite_diff_rel_step workers",
    "tnc": "eps scale offset mesg_num maxCGit eta stepmx accuracy minfev ftol xtol gtol rescale disp "
           "finite_diff_rel_step maxfun workers",
    "cobyla": "rhobeg tol maxiter disp catol f_target",
    "cobyqa": "disp maxfev maxiter f_target feasibility_tol initial_tr_radius final_tr_radius scale",
    "slsqp": "maxiter ftol iprint disp eps finite_diff_rel_step workers",
    "trust-constr": "xtol gtol barrier_tol sparse_jacobian maxiter verbose finite_diff_rel_step "
                    "initial_constr_penalty initial_tr_radius initial_barrier_parameter initial_barrier_tolerance "
                    "factorization_method disp workers",
    "dogleg": "initial_trust_radius max_trust_radius eta gtol maxiter disp return_all",
    "trust-ncg": "initial_trust_radius max_trust_radius eta gtol maxiter disp return_all",
    "trust-exact": "initial_trust_radius max_trust_radius eta gtol maxiter disp return_all subproblem_maxiter",
    "trust-krylov": "initial_trust_radius max_trust_radius eta gtol maxiter disp return_all inexact",
}


class LossNotFinite(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# weights <-> vector


def read_vector(model):
    return np.concatenate([np.reshape(v.numpy(), -1).astype(np.float64) for v in model.trainable_variables])


def load_vector(model, x):
    start = 0
    for v in model.trainable_variables:
        count = int(np.prod(v.shape))
        v.assign(np.reshape(x[start:start + count], v.shape).astype(v.dtype if isinstance(v.dtype, str)
                                                                      else v.dtype.as_numpy_dtype))
        start += count


def join(tensors):
    return np.concatenate([np.reshape(np.asarray(t, dtype=np.float64), -1) for t in tensors])


def cut(model, vector):
    pieces, start = [], 0
    for v in model.trainable_variables:
        count = int(np.prod(v.shape))
        pieces.append(tf.constant(np.reshape(vector[start:start + count], v.shape), dtype=tf.float64))
        start += count
    return pieces


# ----------------------------------------------------------------------------------------------
# per-batch graph pieces, built once per model


def batch_loss(model, x, y, sw, kwargs):
    y_pred = model(x, training=False)
    return tf.cast(model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, **kwargs), tf.float64)


def build_kit(model):
    params = inspect.signature(model.compute_loss).parameters
    kwargs = {"training": False} if "training" in params else {}
    variables = model.trainable_variables
    zero = tf.UnconnectedGradients.ZERO

    def dense(grads):
        return [tf.convert_to_tensor(g) for g in grads]

    def loss_fn(x, y, sw):
        return batch_loss(model, x, y, sw, kwargs)

    def grad_fn(x, y, sw):
        with tf.GradientTape() as tape:
            loss = batch_loss(model, x, y, sw, kwargs)
        return loss, dense(tape.gradient(loss, variables, unconnected_gradients=zero))

    def hvp_fn(x, y, sw, vectors):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = batch_loss(model, x, y, sw, kwargs)
            grads = dense(inner.gradient(loss, variables, unconnected_gradients=zero))
            inner_product = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) * p) for g, p in zip(grads, vectors,
                                                                                                  strict=True)])
        return dense(outer.gradient(inner_product, variables, unconnected_gradients=zero))

    return {
        "loss": tf.function(loss_fn, reduce_retracing=True),
        "grad": tf.function(grad_fn, reduce_retracing=True),
        "hvp": tf.function(hvp_fn, reduce_retracing=True),
    }


# ----------------------------------------------------------------------------------------------
# the functions scipy calls (stateless: each loads its own x)


def remember(x, value, state):
    if not np.isfinite(value):
        raise LossNotFinite(f"loss is {value}")
    if value < state["best_f"]:
        state["best_f"] = value
        state["best_x"] = np.array(x, dtype=np.float64, copy=True)


def loss_only(x, model, batches, state):
    state["nfev"] += 1
    load_vector(model, x)
    values = [float(state["kit"]["loss"](bx, by, bsw)) for bx, by, bsw in batches]
    value = float(np.mean(values))
    remember(x, value, state)
    return value


def loss_and_grad(x, model, batches, state):
    state["nfev"] += 1
    state["njev"] += 1
    load_vector(model, x)
    values, grads = [], []
    for bx, by, bsw in batches:
        loss, grad = state["kit"]["grad"](bx, by, bsw)
        values.append(float(loss))
        grads.append(join(grad))
    value = float(np.mean(values))
    remember(x, value, state)
    return value, np.mean(grads, axis=0)


def hessian_vector(x, p, model, batches, state):
    state["nhev"] += 1
    load_vector(model, x)
    vectors = cut(model, np.asarray(p, dtype=np.float64))
    products = [join(state["kit"]["hvp"](bx, by, bsw, vectors)) for bx, by, bsw in batches]
    return np.mean(products, axis=0)


def hessian_matrix(x, model, batches, state):
    state["nhev"] += 1
    load_vector(model, x)
    n = x.size
    columns = []
    for j in range(n):
        unit = np.zeros(n)
        unit[j] = 1.0
        vectors = cut(model, unit)
        columns.append(np.mean([join(state["kit"]["hvp"](bx, by, bsw, vectors)) for bx, by, bsw in batches],
                               axis=0))
    matrix = np.stack(columns, axis=1)
    return (matrix + matrix.T) / 2.0


# ----------------------------------------------------------------------------------------------
# helpers for the train function


def split_batch(batch):
    if isinstance(batch, (tuple, list)):
        batch = tuple(batch) + (None, None)
        return batch[0], batch[1], batch[2]
    return batch, None, None


def stack(parts):
    if parts[0] is None:
        return None
    return tf.nest.map_structure(lambda *leaves: np.concatenate([np.asarray(a) for a in leaves]), *parts)


def nonneg_lower_bounds(model):
    lower = []
    for v in model.trainable_variables:
        constraint = getattr(v, "constraint", None)
        is_nonneg = constraint is not None and type(constraint).__name__ == "NonNeg"
        lower.append(np.full(int(np.prod(v.shape)), 0.0 if is_nonneg else -np.inf))
    return np.concatenate(lower)


def epoch_metrics(model, batches):
    model.reset_metrics()
    logs = {}
    for bx, by, bsw in batches:
        data = (bx,) if by is None else (bx, by) if bsw is None else (bx, by, bsw)
        logs = model.test_step(data)
    logs = {k: float(np.asarray(v)) for k, v in dict(logs).items() if np.ndim(v) == 0}
    model.reset_metrics()
    return logs


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    _refusals.require_compiled(model)
    if isinstance(method, str) and method.lower() in ("lm", "trf", "dogbox"):
        raise ValueError(f"method={method!r} (scipy.optimize.least_squares) is not supported by args_style; use "
                         "one of the minimize methods: " + ", ".join(METHODS))
    name = _refusals.canonical_method(method, METHODS)
    maxiter = _refusals.require_maxiter(maxiter)
    bounds = options.pop("bounds", None)
    _refusals.require_bounds_allowed(method, bounds, BOUNDED)
    lo_hi = None if bounds is None else _refusals.bound_pair(bounds)
    _refusals.require_deterministic(model)
    _refusals.require_full_precision(model)
    tol = options.pop("tol", None)
    known = SOLVER_OPTIONS[name].split()
    unused = [k for k in options if k not in known]
    if unused:
        warnings.warn(f"{method}: ignoring option(s) {unused}; this method takes: {', '.join(known)}",
                      UserWarning, stacklevel=2)
    solver_options = {k: v for k, v in options.items() if k in known}

    memory = {"marker": None, "logs": None, "drained": False, "kit": None}

    def run(batches):
        x0 = read_vector(model)
        if memory["kit"] is None:
            memory["kit"] = build_kit(model)
        state = {"kit": memory["kit"], "nfev": 0, "njev": 0, "nhev": 0, "best_f": np.inf, "best_x": None}
        lower, upper = np.full(x0.size, -np.inf), np.full(x0.size, np.inf)
        if lo_hi is not None:
            lower[:], upper[:] = lo_hi
        scipy_bounds = None
        if method.upper() in [b.upper() for b in BOUNDED]:
            lower = np.maximum(lower, nonneg_lower_bounds(model))
            if np.isfinite(lower).any() or np.isfinite(upper).any():
                scipy_bounds = scipy.optimize.Bounds(lower, upper)
                x0 = np.clip(x0, lower, upper)
        opts = dict(solver_options)
        if maxiter is not None:
            if name == "tnc":
                opts["maxfun"] = maxiter
            elif name == "cobyla":
                opts["maxiter"] = max(maxiter, x0.size + 2)
            else:
                opts["maxiter"] = maxiter
        extra = {}
        if scipy_bounds is not None:
            extra["bounds"] = scipy_bounds
        if tol is not None:
            extra["tol"] = tol
        if name in WITH_HESSP:
            extra["hessp"] = hessian_vector
        if name in WITH_HESS:
            extra["hess"] = hessian_matrix
        steps = [0]
        extra["callback"] = lambda *a: steps.__setitem__(0, steps[0] + 1)
        args = (model, batches, state)
        try:
            if name in GRADIENT_FREE:
                result = scipy.optimize.minimize(loss_only, x0, args=args, method=method, options=opts, **extra)
            else:
                result = scipy.optimize.minimize(loss_and_grad, x0, args=args, jac=True, method=method,
                                                 options=opts, **extra)
            final = result.x if scipy_bounds is None else np.clip(result.x, lower, upper)
        except LossNotFinite as problem:
            final = state["best_x"] if state["best_x"] is not None else x0
            result = scipy.optimize.OptimizeResult(x=final, fun=state["best_f"], nit=steps[0], success=False,
                                                   message=f"stopped on a non-finite loss ({problem}); model left "
                                                           "at the best finite point")
        except BaseException:
            load_vector(model, state["best_x"] if state["best_x"] is not None else x0)
            raise
        load_vector(model, final)
        train_function.result = result
        logs = epoch_metrics(model, batches)
        logs["loss"] = float(np.mean([float(state["kit"]["loss"](bx, by, bsw)) for bx, by, bsw in batches]))
        nit = result.get("nit")
        logs.update(nit=int(nit if nit is not None else result.get("nfev", state["nfev"])), nfev=state["nfev"],
                    njev=state["njev"], nhev=state["nhev"])
        if verbose:
            print(f"{method}: loss {logs['loss']:.6g}, nit {logs['nit']}, nfev {logs['nfev']}: {result.message}")
        return logs

    def train_function(iterator):
        history = getattr(model, "history", None)
        epochs = getattr(history, "epoch", None)
        marker = (id(history), id(epochs), len(epochs) if epochs is not None else -1, history, epochs)
        if history is not None and memory["marker"] is not None and memory["marker"][:3] == marker[:3]:
            if memory["drained"]:
                raise StopIteration
            return memory["logs"]
        steps = history.params.get("steps") if history is not None and getattr(history, "params", None) else None
        raw = []
        while steps is None or len(raw) < steps:
            try:
                raw.append(next(iterator))
            except (StopIteration, tf.errors.OutOfRangeError):
                break
        if not raw:
            raise ValueError("No data reached the train function (empty training set): pass at least one sample.")
        batches = [split_batch(b) for b in raw]
        whole = [stack([b[i] for b in batches]) for i in range(3)]
        _refusals.require_data(*whole)
        _refusals.require_embedding_ids(model, whole[0])
        if not model.trainable_variables:
            model(batches[0][0], training=False)
        if not model.trainable_variables:
            raise ValueError("The model has no trainable weights; nothing to optimize.")
        memory["logs"] = run(batches)
        memory["marker"] = marker
        memory["drained"] = steps is None
        return memory["logs"]

    train_function.result = None
    return train_function
