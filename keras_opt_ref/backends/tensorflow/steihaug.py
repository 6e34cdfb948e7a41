"""scipy's trust-ncg subproblem (CG-Steihaug) inside one compiled TensorFlow call.

``solve`` takes the same steps, with the same stopping rules, as ``scipy.optimize``'s
``CGSteihaugSubproblem.solve`` (Nocedal & Wright, algorithm 7.2), from scipy's own ``f`` and ``g``
at ``x``, with a Hessian-vector product ``hvp`` built in the same graph; ``train.trust_ncg`` hands
scipy its result. One call per outer iteration instead of one per product.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

__all__ = ["solve"]


def solve(hvp: Callable[[tf.Tensor], tf.Tensor], f: tf.Tensor, g: tf.Tensor, radius: tf.Tensor) -> tuple:
    """Inside a graph: ``(p, hits_boundary, H p, count)``, ``count`` HVPs in all (negative if one was
    not finite). Status 0: go on, 1: non-positive curvature, 2: the step leaves the region,
    3: converged inside, 4: nothing to do, 5: NaN."""
    dot = lambda a, b: tf.reduce_sum(a * b)  # noqa: E731

    def crossings(z, d):  # t with ||z + t d|| = radius, low and high (scipy's formula)
        a, b, c = dot(d, d), 2.0 * dot(z, d), dot(z, z) - radius**2
        root = tf.sqrt(b * b - 4.0 * a * c)
        aux = b + tf.where(b < 0, -root, root)
        ta, tb = -aux / (2.0 * a), -2.0 * c / aux
        return tf.minimum(ta, tb), tf.maximum(ta, tb)

    g_norm = tf.norm(g)
    tolerance = tf.minimum(tf.constant(0.5, tf.float64), tf.sqrt(g_norm)) * g_norm
    zero = tf.zeros_like(g)

    def body(z, r, d, count, status, p):
        bd = hvp(d)
        dbd = dot(d, bd)
        r_sq = dot(r, r)
        alpha = r_sq / dbd
        z_next = z + alpha * d
        r_next = r + alpha * bd
        r_next_sq = dot(r_next, r_next)
        status = tf.where(~tf.math.is_finite(dbd), 5, tf.where(dbd <= 0, 1, tf.where(
            tf.norm(z_next) >= radius, 2, tf.where(tf.sqrt(r_next_sq) < tolerance, 3, 0))))
        go_on = tf.equal(status, 0)
        p = tf.where(tf.equal(status, 2), z + crossings(z, d)[1] * d, z_next)
        d_next = -r_next + (r_next_sq / r_sq) * d
        return (tf.where(go_on, z_next, z), tf.where(go_on, r_next, r), tf.where(go_on, d_next, d), count + 1,
                status, p)

    start = tf.where(g_norm < tolerance, 4, 0)
    z, _, d, count, status, p = tf.while_loop(
        lambda *state: tf.equal(state[4], 0), body, (zero, g, -g, tf.constant(0), start, zero))

    def boundary_by_model():  # the crossing with the lower model value (two more HVPs, as scipy)
        ta, tb = crossings(z, d)
        pa, pb = z + ta * d, z + tb * d
        ma, mb = (f + dot(g, q) + 0.5 * dot(q, hvp(q)) for q in (pa, pb))
        return tf.where(ma < mb, pa, pb)

    curved = tf.equal(status, 1)
    p = tf.cond(curved, boundary_by_model, lambda: tf.where(tf.equal(status, 4), zero, p))
    count += tf.where(curved, 2, 0)
    hp = hvp(p)  # scipy's m(p) for the predicted reduction
    count += 1
    bad = tf.equal(status, 5) | ~tf.reduce_all(tf.math.is_finite(hp))
    return p, (status == 1) | (status == 2), hp, tf.where(bad, -count, count)

