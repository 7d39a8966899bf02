"""Differentiable fake-quant: the supernet's numerics with a straight-through estimator.

AQT's conv is fake-quant without a gradient (the kernel's gradient is exactly 0) and
`numerics.py` runs with AQT's custom VJP off, so nothing can be optimized through
it. Block reconstruction (`reconstruction.py`) needs gradients w.r.t. the stored
calibration results, so this module re-states the forward of `numerics.py` in plain
jnp, op for op (a test holds it equal to `numerics.fake_quant_weight` /
`fake_quant_activation` bit for bit at every width), under a `jax.custom_vjp`:

* x: straight through inside the clip range, 0 outside (the clipped values);
* the scale s (LSQ, Esser et al. 2020, arXiv 1902.08153): y = s * q(x / s), so
  dy/ds = q - x/s inside the range and q (= +-the clip level) outside.

The stored parameters are differentiated through plain jnp: an activation's per-
tensor |x| `bound` (scale = bound / quant_bound) and a weight's per-output-channel
`clip_ratio` to the channel absmax (scale = absmax * ratio / quant_bound), exactly
the two fields of `supernet.QParams`. LSQ's gradient scale 1/sqrt(N Q_p) is left
out: the reconstruction uses Adam, which is invariant to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from tmpq_jax.quant import numerics


def quant_bound(bits) -> jax.Array:
    """AQT's `get_quant_bound` of `TracedIntSymmetric`: 2**(bits-1) - 0.5."""
    return numerics._pow2(bits - 1) - 0.5


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast gradient back to `shape` (numpy broadcasting rules)."""
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


@jax.custom_vjp
def fake_quant(x: jax.Array, scale: jax.Array, qb: jax.Array) -> jax.Array:
    """s * round_half_even(clip(x / s, +-(qb - 0.5))), with AQT's arithmetic: x is
    multiplied by `lax.reciprocal(s)` (inf -> 1), rounded values pass an int8
    container. `scale` broadcasts against x; `qb` = `quant_bound(bits)`."""
    return _forward(x, scale, qb)[0]


def _forward(x, scale, qb):
    s_inv = lax.reciprocal(scale)
    s_inv = jnp.where(jnp.isinf(s_inv), jnp.ones_like(s_inv), s_inv)
    v = x * s_inv
    clip = qb - 0.5  # AQT's forward clip bound when rounding
    q = lax.round(jnp.clip(v, -clip, clip), lax.RoundingMethod.TO_NEAREST_EVEN)
    q = q.astype(jnp.int8).astype(x.dtype)
    return q * scale, (v, q, clip)


def _fwd(x, scale, qb):
    y, (v, q, clip) = _forward(x, scale, qb)
    return y, (v, q, clip, scale)


def _bwd(res, g):
    v, q, clip, scale = res
    inside = jnp.abs(v) <= clip
    dx = jnp.where(inside, g, jnp.zeros_like(g))
    ds = _sum_to(g * jnp.where(inside, q - v, q), jnp.shape(scale))
    return dx, ds.astype(scale.dtype), jnp.zeros_like(clip)


fake_quant.defvjp(_fwd, _bwd)


def act_scale(bound, bits, ndim: int) -> jax.Array:
    """Per-tensor scale of `PerTensorCalibration` for a static |x| `bound`,
    shaped (1,) * ndim (0 -> 1, as AQT)."""
    bound = jnp.broadcast_to(jnp.asarray(bound, jnp.float32), (1,) * ndim)
    bound = jnp.where(bound == 0.0, jnp.ones_like(bound), bound)
    return bound / quant_bound(bits)


def weight_scale(w: jax.Array, clip_ratio, bits) -> jax.Array:
    """Per-output-channel (last axis) scale of `ChannelCalibration`: channel absmax
    (0 -> 1) times `clip_ratio` ([C_out] or None), over the quant bound."""
    axes = tuple(range(w.ndim - 1))
    abs_max = jnp.max(jnp.abs(lax.stop_gradient(w)), axis=axes, keepdims=True)
    abs_max = jnp.where(abs_max == 0.0, jnp.ones_like(abs_max), abs_max)
    if clip_ratio is not None:
        abs_max = abs_max * jnp.reshape(clip_ratio, abs_max.shape)
    return abs_max / quant_bound(bits)


def fake_quant_activation(x: jax.Array, bits, bound) -> jax.Array:
    """== `numerics.fake_quant_activation(x, ActQuant(bits, bound))[0]` for a static
    `bound`, differentiable w.r.t. x and `bound`."""
    return fake_quant(x, act_scale(bound, bits, x.ndim), quant_bound(bits))


def fake_quant_weight(w: jax.Array, bits, clip_ratio=None) -> jax.Array:
    """== `numerics.fake_quant_weight(w, WeightQuant(bits, clip_ratio))[0]`,
    differentiable w.r.t. `clip_ratio` (and w, straight through)."""
    return fake_quant(w, weight_scale(w, clip_ratio, bits), quant_bound(bits))
