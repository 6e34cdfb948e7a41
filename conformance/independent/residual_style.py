"""residual_style: a Keras wrapper built around scipy.optimize.least_squares (curve fitting), with L-BFGS-B too.

The epoch's batches are drained into tensors on the epoch's first call. For "lm", "trf" and "dogbox" the model
is fitted as a least-squares problem: the residual vector stacks, output by output, sqrt(loss weight * sample
weight) * (pred - y) computed with model(x, training=False), and scipy.optimize.least_squares gets an exact
dense Jacobian (tf.GradientTape.jacobian in a tf.function, jac=<callable>, max_nfev=maxiter, other options as
keyword arguments). "L-BFGS-B" minimizes Keras's own full-batch loss (model.compute_loss, regularization and
add_loss terms included) through scipy.optimize.minimize(jac=True) with its tf.GradientTape gradient.

Levels offered: lm, trf, dogbox (least squares) and L-BFGS-B (minimize); every other method is refused with a
ValueError. No curvature (hess/hessp). Bounds: bounds=(lo, hi) accepted for trf, dogbox and L-BFGS-B (refused
for lm). History: loss and compiled metrics at the final weights (Keras's own test_step on the whole epoch) plus
counts nit, nfev, njev (least squares: nit = nfev since scipy reports no iterations; njev from the result).
Refused (via _refusals): not compiled, bad maxiter, stochastic layers (require_deterministic), float16/bfloat16,
non-finite or empty data, Embedding ids out of range, negative sample weights (least squares), lm with fewer
residuals than weights, least squares on a model with regularization/add_loss terms. Result written back; on
NaN/Inf or any exception during the run the model is left at the best finite point evaluated (then the exception
is re-raised; a NaN/Inf stops the run and fit continues). One scipy run per epoch, epochs told apart by fit's
History callback (model.history and its epoch list). The interface's default method="CG" is not offered, so it is
refused; maxiter=0 with least squares runs nothing (scipy refuses max_nfev=0) and keeps the weights.

BUG (deliberate) a: the residuals are NOT scaled by 1/sqrt(N) (N = samples x output width): r_i = sqrt(w_i) *
(pred_i - y_i), so r.r = N x Keras's mse loss (same minimizer for one output; with several outputs each output's
term is weighted by its own N). L-BFGS-B uses the correct loss.
BUG (deliberate) b: the Jacobian ignores the sample weights: J = d(pred - y)/dx instead of d(sqrt(w) (pred - y))/dx,
so with sample_weight/class_weight it is not the derivative of the residuals (without them it is exact).
BUG (deliberate) c: bounds are handed to minimize (L-BFGS-B) but silently dropped for least_squares trf/dogbox
(accepted, never passed to scipy).
BUG (deliberate) d: any compiled loss is accepted for least squares: the residuals are always pred - y whatever
the loss (mae, binary_crossentropy, ...), so a non-squared loss is not refused and r.r is the squared error.
"""

import inspect

import numpy as np
import scipy.optimize
import tensorflow as tf

from . import _refusals

METHODS = ("lm", "trf", "dogbox", "L-BFGS-B")
LEAST_SQUARES = ("lm", "trf", "dogbox")
BOUNDED = ("trf", "dogbox", "L-BFGS-B")


class _StopRun(Exception):
    """A NaN/Inf objective: end the scipy run, keep the best finite point."""


def _batches_to_tensors(batches):
    parts = []
    for batch in batches:
        batch = batch if isinstance(batch, tuple) else (batch,)
        parts.append(tuple(batch) + (None,) * (3 - len(batch)))
    if not parts:
        return None, None, None

    def concat(*leaves):
        return None if leaves[0] is None else tf.concat(leaves, axis=0)

    return tuple(tf.nest.map_structure(concat, *column) for column in zip(*parts, strict=True))


class ResidualFit:
    """One epoch's data and the model as functions of a flat float64 vector x (tf.functions from `owner`)."""

    def __init__(self, owner, data):
        self.owner, self.data = owner, data
        self.variables = list(owner.model.trainable_variables)
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.best_x, self.best_value, self.current = self.get_x(), np.inf, None
        self.nfev = self.njev = 0

    def get_x(self):
        return np.concatenate([np.ravel(np.asarray(v.numpy(), dtype=np.float64)) for v in self.variables]
                              or [np.zeros(0)])

    def set_x(self, x):
        if self.current is not None and np.array_equal(self.current, x):
            return
        for variable, chunk in zip(self.variables, np.split(x, np.cumsum(self.sizes)[:-1]), strict=True):
            variable.assign(tf.constant(np.reshape(chunk, tuple(variable.shape)), dtype=variable.dtype))
        self.current = np.array(x, dtype=np.float64)

    def _track(self, x, value):
        if not np.isfinite(value):
            raise _StopRun(value)
        if value < self.best_value:
            self.best_value, self.best_x = value, np.array(x, dtype=np.float64)

    def residuals(self, x):
        self.set_x(x)
        self.nfev += 1
        r = np.asarray(self.owner.residuals_tf(*self.data), dtype=np.float64)
        self._track(x, 0.5 * float(r @ r) if np.all(np.isfinite(r)) else np.nan)
        return r

    def jacobian(self, x):
        self.set_x(x)
        self.njev += 1
        return np.asarray(self.owner.jacobian_tf(*self.data), dtype=np.float64)

    def loss_and_grad(self, x):
        self.set_x(x)
        self.nfev += 1
        self.njev += 1
        loss, grads = self.owner.loss_and_grad_tf(*self.data)
        self._track(x, float(loss))
        return float(loss), np.concatenate([np.ravel(np.asarray(g, dtype=np.float64)) for g in grads])


def _loss_weights(model, count, pred):
    compiled = getattr(model, "_compile_loss", None) or getattr(model, "compiled_loss", None)
    weights = getattr(compiled, "_user_loss_weights", None)
    if weights is None:
        return [1.0] * count
    if isinstance(weights, dict):
        names = sorted(pred) if isinstance(pred, dict) else list(model.output_names)
        return [float(weights.get(name, 1.0)) for name in names]
    flat = [float(w) for w in tf.nest.flatten(weights)]
    return flat * count if len(flat) == 1 else flat


def _residual_vector(model, x, y, sample_weight, weighted):
    pred = model(x, training=False)
    preds = tf.nest.flatten(pred)
    targets = [y[name] for name in model.output_names] if isinstance(y, dict) and not isinstance(pred, dict) \
        else tf.nest.flatten(y)
    sws = [s for s in tf.nest.flatten(sample_weight) if s is not None]
    parts = []
    for i, (p, t, lw) in enumerate(zip(preds, targets, _loss_weights(model, len(preds), pred), strict=True)):
        diff = p - tf.reshape(tf.cast(t, p.dtype), tf.shape(p))  # BUG d: pred - y whatever the compiled loss
        scale = tf.sqrt(tf.constant(lw, p.dtype))  # BUG a: no 1/sqrt(N) factor
        if weighted and sws:
            w = tf.cast(sws[i] if len(sws) > 1 else sws[0], p.dtype)
            w = tf.reshape(w, tf.concat([tf.shape(w), tf.ones([tf.rank(p) - tf.rank(w)], tf.int32)], 0))
            scale = scale * tf.sqrt(w)
        parts.append(tf.reshape(scale * diff, [-1]))
    return tf.concat(parts, axis=0)


class ResidualTrainFunction:
    def __init__(self, model, method, maxiter, verbose, bounds, options):
        self.model, self.method, self.maxiter, self.verbose = model, method, maxiter, verbose
        self.bounds, self.options = bounds, options
        self._epoch_key, self._logs, self._exhausted = None, None, False
        self.residuals_tf = tf.function(self._residuals, reduce_retracing=True)
        self.jacobian_tf = tf.function(self._jacobian, reduce_retracing=True)
        self.loss_and_grad_tf = tf.function(self._loss_and_grad, reduce_retracing=True)

    def _residuals(self, x, y, sample_weight):
        return _residual_vector(self.model, x, y, sample_weight, weighted=True)

    def _jacobian(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            r = _residual_vector(self.model, x, y, sample_weight, weighted=False)  # BUG b: J ignores sample weights
        blocks = tape.jacobian(r, self.model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(tf.convert_to_tensor(b), [tf.size(r), -1]) for b in blocks], axis=1)

    def _loss_and_grad(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            if "training" in inspect.signature(self.model.compute_loss).parameters:
                loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
            else:
                loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads = tape.gradient(loss, self.model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, [tf.convert_to_tensor(g) for g in grads]

    def __call__(self, iterator):
        history = getattr(self.model, "history", None)
        key = (history, len(getattr(history, "epoch", None) or []), iterator)
        old = self._epoch_key
        if old is not None and old[0] is key[0] and old[1] == key[1] and old[2] is key[2]:
            if self._exhausted:
                raise StopIteration
            return dict(self._logs)
        steps = (getattr(history, "params", None) or {}).get("steps")
        batches, self._exhausted = [], False
        while steps is None or len(batches) < steps:
            try:
                batches.append(next(iterator))
            except (StopIteration, tf.errors.OutOfRangeError):
                self._exhausted = True
                break
        self._logs = self._fit_epoch(_batches_to_tensors(batches))
        self._epoch_key = key
        return dict(self._logs)

    def _check(self, x, y, sample_weight):
        _refusals.require_data(x, y, sample_weight)
        _refusals.require_embedding_ids(self.model, x)
        if self.method in LEAST_SQUARES:
            _refusals.require_nonnegative_weights(sample_weight)
            self.model(x, training=False)
            if self.model.losses:
                raise ValueError(f"Method {self.method!r} (least squares) cannot express the model's "
                                 f"{len(self.model.losses)} regularization/add_loss term(s) as residuals: remove "
                                 "them or use method='L-BFGS-B'.")

    def _fit_epoch(self, data):
        if data[0] is not None and not getattr(self.model, "built", True):
            self.model(data[0], training=False)
            _refusals.require_full_precision(self.model)
        self._check(*data)
        fit = ResidualFit(self, data)
        x0 = fit.get_x()
        try:
            if self.method in LEAST_SQUARES:
                m = int(self.residuals_tf(*data).shape[0])
                if self.method == "lm" and m < x0.size:
                    raise ValueError(f"Method 'lm' needs at least as many residuals as weights: {m} residuals "
                                     f"(samples x outputs) < {x0.size} weights; use 'trf' or 'dogbox'.")
                if self.maxiter == 0:  # least_squares refuses max_nfev=0: no evaluation, x0 stays
                    result = scipy.optimize.OptimizeResult(x=x0, nfev=0, njev=0, message="maxiter=0")
                else:  # BUG c: self.bounds is accepted for trf/dogbox but never handed to least_squares
                    result = scipy.optimize.least_squares(fit.residuals, x0, jac=fit.jacobian, method=self.method,
                                                          max_nfev=self.maxiter, **self.options)
                counts = {"nit": int(result.nfev), "nfev": int(result.nfev), "njev": int(result.njev or 0)}
            else:
                options = dict(self.options)
                if self.maxiter is not None:
                    options["maxiter"] = self.maxiter
                bounds = None if self.bounds is None else [self.bounds] * x0.size
                result = scipy.optimize.minimize(fit.loss_and_grad, x0, method="L-BFGS-B", jac=True,
                                                 bounds=bounds, options=options)
                counts = {"nit": int(result.nit), "nfev": int(result.nfev), "njev": int(result.njev)}
            final, message = np.asarray(result.x, dtype=np.float64), result.message
        except _StopRun as stop:
            final, message = fit.best_x, f"stopped at a non-finite objective ({stop.args[0]})"
            counts = {"nit": fit.nfev, "nfev": fit.nfev, "njev": fit.njev}
        except BaseException:
            fit.current = None
            fit.set_x(fit.best_x)
            raise
        fit.current = None
        fit.set_x(final)
        self.model.reset_metrics()
        logs = {name: float(np.asarray(v)) for name, v in self.model.test_step(data).items()}
        if self.verbose:
            print(f"residual_style {self.method}: loss {logs['loss']:.6g}, {counts} ({message})")
        return {**logs, **counts}


def make_train_function(model, method="CG", maxiter=None, verbose=0, **options):
    """Return a train function for model.train_function: one least_squares / L-BFGS-B run per epoch."""
    _refusals.require_compiled(model)
    method = _refusals.canonical_method(method, METHODS)  # the default "CG" is not offered here: refused
    method = "L-BFGS-B" if method == "l-bfgs-b" else method
    maxiter = _refusals.require_maxiter(maxiter)
    bounds = options.pop("bounds", None)
    if bounds is not None:
        bounds = _refusals.bound_pair(bounds)
        _refusals.require_bounds_allowed(method, bounds, BOUNDED)
    _refusals.require_deterministic(model)
    if getattr(model, "built", True):  # an unbuilt model is checked once fit has built it
        _refusals.require_full_precision(model)
    return ResidualTrainFunction(model, method, maxiter, verbose, bounds, options)
