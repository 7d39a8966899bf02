"""The BitOPs budget: cost of a genome, the repair operator and the penalty.

TMPQ-DM (arXiv 2404.09532) gives over-budget candidates a penalty fitness. We also
build a repair operator: while a genome is over budget, lower by one candidate
width the larger-bit gene of the layer that costs the most BitOPs (among layers
that can still go lower); in `variable` mode, drop a step once no bit can go lower.
Both are jittable and vmappable; the budget is the *total* over the steps
(per-step BitOPs x distinct steps), so fewer steps buy more bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError
from tmpq_jax.quant import cost
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QuantBits
from tmpq_jax.search.space import GenomeSpace


def genome_cost(space: GenomeSpace, registry: LayerRegistry, g: jax.Array):
    """(total BitOPs over the schedule, BitOPs per step, weight bits) of one genome."""
    d = space.decode(g)
    per_step = cost.bitops_per_step(d.bits, registry)
    return per_step * d.num_steps, per_step, cost.model_size_bits(d.bits, registry)


def budget_bitops(
    registry: LayerRegistry, w_bits: int, a_bits: int, num_steps: int
) -> float:
    """Total BitOPs of uniform W{w_bits}A{a_bits} over `num_steps` steps."""
    return float(cost.uniform_bitops(registry, w_bits, a_bits)) * num_steps


def min_bitops(space: GenomeSpace, registry: LayerRegistry) -> float:
    """The cheapest genome of the box: every gene at its lowest width, fewest steps."""
    g = np.where(space.searched, space.hi - 1, space.lo)
    g[: space.num_steps] = space.seed[: space.num_steps]  # timesteps don't cost
    if space.mode == "variable":
        g[space.num_steps] = space.min_steps
    return float(genome_cost(space, registry, jnp.asarray(g))[0])


def check_budget(space: GenomeSpace, registry: LayerRegistry, budget: float) -> None:
    """Refuses, before any work, a budget that no genome of the box can meet."""
    floor = min_bitops(space, registry)
    if not cost.within_budget(floor, budget):
        fix = f"raise the budget to at least {floor:.4g} or add lower candidate widths"
        if space.candidates == (cost.FLOAT_BITS,):  # space=timesteps_fp
            fix = (f"the float model costs {cost.FLOAT_BITS} x {cost.FLOAT_BITS} bits "
                   "a MAC: set search.budget_w_bits=32 and search.budget_a_bits=32")  # fmt: skip
        raise UserError(
            f"BitOPs budget {budget:.4g} is below the cheapest genome of this search "
            f"space ({floor:.4g}); {fix}."
        )


def repair(
    space: GenomeSpace, registry: LayerRegistry, g: jax.Array, budget
) -> jax.Array:
    """Lowers bits of the costliest layers until `g` fits `budget` (or can't)."""
    searched = jnp.asarray(space.searched)
    w_sl, a_sl = space.w_slice, space.a_slice
    w_free = searched[w_sl]
    a_free = searched[a_sl]
    hi = jnp.asarray(space.hi)
    cands = jnp.asarray(space.candidates, jnp.int32)
    pinned = jnp.asarray(registry.pinned_lhs_bits)

    def lowerable(g):
        w_ok = w_free & (g[w_sl] < hi[w_sl] - 1)
        a_ok = a_free & (g[a_sl] < hi[a_sl] - 1)
        return w_ok, a_ok

    def over(g):
        return ~cost.within_budget(genome_cost(space, registry, g)[0], budget)

    def can_move(g):
        w_ok, a_ok = lowerable(g)
        more = jnp.any(w_ok | a_ok)
        if space.mode == "variable":
            more |= g[space.num_steps] > space.min_steps
        return more

    def step(g):
        w_ok, a_ok = lowerable(g)
        bits = QuantBits(cands[g[w_sl]], cands[g[a_sl]])
        per_layer = cost.layer_bitops(bits, registry)
        layer = jnp.argmax(jnp.where(w_ok | a_ok, per_layer, -1.0))
        wb, ab = bits.w_bits[layer], jnp.where(pinned[layer] > 0, 0, bits.a_bits[layer])
        lower_w = w_ok[layer] & ((wb >= ab) | ~a_ok[layer])
        any_bit = jnp.any(w_ok | a_ok)
        w_start, a_start = w_sl.start, a_sl.start
        idx = jnp.where(lower_w, w_start + layer, a_start + layer)
        g_bits = g.at[idx].add(1)
        if space.mode != "variable":
            return g_bits
        g_steps = g.at[space.num_steps].add(-1)
        return jnp.where(any_bit, g_bits, g_steps)

    return jax.lax.while_loop(
        lambda g: over(g) & can_move(g), step, jnp.asarray(g, jnp.int32)
    )


def penalized(fid: jax.Array, bitops: jax.Array, budget, weight: float) -> jax.Array:
    """fid + weight x relative excess over the budget (0 when within it)."""
    excess = jnp.maximum(bitops / budget - 1.0, 0.0)
    excess = jnp.where(cost.within_budget(bitops, budget), 0.0, excess)
    return fid + weight * excess
