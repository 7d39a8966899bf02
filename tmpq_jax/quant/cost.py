"""TMPQ-DM's cost model as jittable functions of a genome's bits.

TMPQ-DM (arXiv 2404.09532): a layer costs `MACs * b_w * b_a` BitOPs; attention adds
`(HW)^2 * C * (b_q * b_k + b_softmax * b_v)`, which is what the registry's two
MatMul layers give (MACs(qk) = MACs(av) = (HW)^2 * C per sample). Uniformly, a layer
costs `MACs * left_bits * right_bits` with the gene convention of `supernet.py`
(left = input activation / q / pinned softmax, right = weight / k / v). The budget is
the BitOPs of the uniform W6A6 network; model size is `sum(params * b_w)` bits
(quantized kernels only; biases and norms stay float and are not counted).

Values are float32 (BitOPs overflow int32 and jax runs without x64): exact integers
up to 2**24, ~1e-7 relative beyond. Compare against a budget with `within_budget`.
All functions accept bits of shape [L] or [P, L] (a population).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tmpq_jax.quant.coverage import float_bitops
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QuantBits

# A layer left in float (a full-precision genome, `space=timesteps_fp`) counts as
# 32 x 32 bits, softmax output included: nothing of it is quantized.
FLOAT_BITS = 32


def layer_bitops(bits: QuantBits, registry: LayerRegistry) -> jax.Array:
    """BitOPs per layer per sample and step: float32[..., L]."""
    pinned = jnp.asarray(registry.pinned_lhs_bits)
    quantized = jnp.asarray(bits.a_bits) < FLOAT_BITS
    left = jnp.where((pinned > 0) & quantized, pinned, bits.a_bits)
    left = left.astype(jnp.float32)
    right = jnp.asarray(bits.w_bits, jnp.float32)
    macs = jnp.asarray(registry.macs, jnp.float32)
    return macs * left * right


def bitops_per_step(bits: QuantBits, registry: LayerRegistry) -> jax.Array:
    """BitOPs of one network evaluation per sample: float32[...]; ops kept in
    float count at 16 x 16 bits (`coverage.float_bitops`)."""
    kept = jnp.float32(float_bitops(registry))
    return jnp.sum(layer_bitops(bits, registry), axis=-1) + kept


def total_bitops(bits: QuantBits, registry: LayerRegistry, num_steps) -> jax.Array:
    """BitOPs of a sampling schedule of `num_steps` (may be traced) evaluations."""
    return bitops_per_step(bits, registry) * jnp.asarray(num_steps, jnp.float32)


def model_size_bits(bits: QuantBits, registry: LayerRegistry) -> jax.Array:
    """Bits of the quantized kernels: sum(params * w_bits), float32[...]."""
    params = jnp.asarray(registry.params, jnp.float32)
    return jnp.sum(params * jnp.asarray(bits.w_bits, jnp.float32), axis=-1)


def uniform_bitops(registry: LayerRegistry, w_bits: int = 6, a_bits: int = 6):
    """BitOPs per step of the uniform WxAy network: TMPQ-DM's budget (W6A6)."""
    return bitops_per_step(QuantBits.uniform(registry, w_bits, a_bits), registry)


def within_budget(bitops, budget, rtol: float = 1e-6) -> jax.Array:
    """bitops <= budget, up to float32 rounding of the two sums."""
    return jnp.asarray(bitops) <= jnp.asarray(budget) * (1.0 + rtol)
