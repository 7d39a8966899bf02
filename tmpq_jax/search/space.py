"""The genome: timestep genes and per-layer bit genes as one int vector in a box.

Gene j takes integer values in [lo[j], hi[j]). Layout (N = num_steps, L = layers):

    [ t_1 .. t_N | n (variable mode only) | w_1 .. w_L | a_1 .. a_L ]

* timestep genes are timesteps. `grouped` (TMPQ-DM): gene i lives in the i-th
  quadratic group [b_i, b_{i+1}); `free` / `variable`: any of [0, T).
* `n` (variable mode): the number of active steps, the first n timestep genes.
* bit genes are indices into `candidates` sorted high to low, so index + 1 is one
  width lower (what the repair operator does).
A frozen gene has hi = lo + 1: the precision-only space freezes the timesteps at
the quad schedule, the timestep-only space freezes the bits at the seed widths (at
32, `FLOAT_BITS`, in `timesteps_fp`: the model runs in float); the
`av` softmax gene (pinned at 8 bits) is frozen at index 0. So every strategy sees
one box and never needs to know which genes matter.

Decoding gives ascending timesteps padded by repeats of the largest active step
(the sampler treats a repeat as a no-op) and `QuantBits`. All of it is jittable;
`decode` takes one genome (vmap it over a population).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.diffusion.flow import flow_gene_groups
from tmpq_jax.diffusion.schedules import quad_group_bounds, quad_timesteps
from tmpq_jax.quant.cost import FLOAT_BITS
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QuantBits
from tmpq_jax.search.config import SearchConfig


class Decoded(NamedTuple):
    timesteps: jax.Array  # int32[N] ascending; inactive steps repeat the last one
    num_steps: jax.Array  # int32[]: distinct active steps
    bits: QuantBits  # int32[L] each


def _step_grids(n: int, T: int, flow_shift: float | None) -> np.ndarray:
    """int32[n + 1, n]: row k (>= 1) the k-step grid (quad timesteps, or a flow
    model's shifted grid), padded with repeats of its last step; row 0 unused."""
    rows = [np.zeros(n, np.int32)]
    for k in range(1, n + 1):
        if flow_shift is not None:
            grid = flow_gene_groups(k, flow_shift, T)[1] - 1
        else:
            grid = quad_timesteps(k, T)
        rows.append(np.concatenate([grid, np.full(n - k, grid[-1])]))
    return np.stack(rows).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class GenomeSpace:
    """Static description of the box; build with `GenomeSpace.build`."""

    mode: str
    num_steps: int
    min_steps: int
    num_timesteps: int
    candidates: tuple[int, ...]  # sorted high to low
    num_layers: int
    lo: np.ndarray  # int32[D]
    hi: np.ndarray  # int32[D], exclusive
    seed: np.ndarray  # int32[D], the quad / uniform-precision starting genome
    # variable mode: row k holds the seed's kind of timestep genes at k steps (the
    # quad schedule, or a flow model's shifted grid), padded as the seed is
    grids: np.ndarray | None = None  # int32[num_steps + 1, num_steps]

    @classmethod
    def build(
        cls,
        cfg: SearchConfig,
        registry: LayerRegistry,
        num_timesteps: int = 1000,
        flow_shift: float | None = None,
    ) -> GenomeSpace:
        """`flow_shift`: a flow model's time genes (`flow.gene_times`, resolution
        `num_timesteps`), grouped by the shifted grid, which is the seed; None:
        integer timesteps in quadratic groups (TMPQ-DM), the quad schedule seed."""
        n, L, T = cfg.num_steps, len(registry), num_timesteps
        cands = tuple(sorted(cfg.candidates, reverse=True))
        if flow_shift is not None:
            groups = flow_gene_groups(n, flow_shift, T)
            quad = groups[1] - 1  # the groups' upper edges: the shifted grid
        else:
            edges = quad_group_bounds(n, T)
            groups, quad = (edges[:-1], edges[1:]), quad_timesteps(n, T)
        if cfg.timestep_mode == "grouped":
            t_lo, t_hi = groups
        else:
            t_lo, t_hi = np.zeros(n, np.int32), np.full(n, T, np.int32)
        if cfg.space == "precision":
            t_lo, t_hi = quad, quad + 1
        n_gene = [(cfg.min_steps, n + 1, n)] if cfg.timestep_mode == "variable" else []
        grids = None
        if n_gene and cfg.space != "precision":
            # The seed: the budget's own steps (quad, or the shifted grid), padded
            # with repeats of its last: uniform seed bits at budget_steps meet a
            # budget of the same bits, as at a fixed N.
            grids = _step_grids(n, T, flow_shift)
            k = min(max(cfg.budget_steps, cfg.min_steps), n)
            quad = grids[k]
            n_gene = [(cfg.min_steps, n + 1, k)]
        seed_w, seed_a = cfg.seed_w_bits, cfg.seed_a_bits
        if cfg.space == "timesteps_fp":  # every layer in float: 32 bits, one value
            cands, seed_w, seed_a = (FLOAT_BITS,), FLOAT_BITS, FLOAT_BITS
        seed_bits = QuantBits.uniform(registry, seed_w, seed_a)
        w_seed = np.array([cands.index(int(b)) for b in np.asarray(seed_bits.w_bits)])
        a_seed = np.array([cands.index(int(b)) for b in np.asarray(seed_bits.a_bits)])
        pinned = registry.pinned_lhs_bits > 0
        a_seed = np.where(pinned, 0, a_seed)
        if cfg.space in ("timesteps", "timesteps_fp"):
            w_lo, w_hi = w_seed, w_seed + 1
            a_lo, a_hi = a_seed, a_seed + 1
        else:
            w_lo, w_hi = np.zeros(L, int), np.full(L, len(cands))
            a_lo, a_hi = np.zeros(L, int), np.where(pinned, 1, len(cands))
        lo = np.concatenate([t_lo, [g[0] for g in n_gene], w_lo, a_lo])
        hi = np.concatenate([t_hi, [g[1] for g in n_gene], w_hi, a_hi])
        seed = np.concatenate([quad, [g[2] for g in n_gene], w_seed, a_seed])
        return cls(
            mode=cfg.timestep_mode,
            num_steps=n,
            min_steps=cfg.min_steps if cfg.timestep_mode == "variable" else n,
            num_timesteps=T,
            candidates=cands,
            num_layers=L,
            lo=lo.astype(np.int32),
            hi=hi.astype(np.int32),
            seed=seed.astype(np.int32),
            grids=grids,
        )

    # -- layout ---------------------------------------------------------------
    @property
    def num_genes(self) -> int:
        return int(self.lo.shape[0])

    @property
    def _bits_start(self) -> int:
        return self.num_steps + (self.mode == "variable")

    @property
    def w_slice(self) -> slice:
        return slice(self._bits_start, self._bits_start + self.num_layers)

    @property
    def a_slice(self) -> slice:
        s = self._bits_start + self.num_layers
        return slice(s, s + self.num_layers)

    @property
    def searched(self) -> np.ndarray:
        """bool[D]: genes with more than one value."""
        return self.hi - self.lo > 1

    # -- decoding -------------------------------------------------------------
    def decode(self, g: jax.Array) -> Decoded:
        g = jnp.asarray(g, jnp.int32)
        cands = jnp.asarray(self.candidates, jnp.int32)
        bits = QuantBits(cands[g[self.w_slice]], cands[g[self.a_slice]])
        ts = g[: self.num_steps]
        if self.mode == "grouped":
            return Decoded(ts, jnp.int32(self.num_steps), bits)
        if self.mode == "free":
            ts = jnp.sort(ts)
        else:  # variable: the first n genes are active
            n = g[self.num_steps]
            active = jnp.arange(self.num_steps) < n
            ts = jnp.sort(jnp.where(active, ts, self.num_timesteps))
            last = ts[n - 1]
            ts = jnp.where(ts >= self.num_timesteps, last, ts)
        distinct = 1 + jnp.sum(ts[1:] != ts[:-1])
        return Decoded(ts, distinct.astype(jnp.int32), bits)

    def encode(self, timesteps, bits: QuantBits, num_steps: int | None = None):
        """Host-side: a concrete genome from timesteps (ascending) and bits."""
        ts = np.asarray(timesteps, np.int32)
        n = len(ts) if num_steps is None else num_steps
        ts = np.concatenate([ts, np.full(self.num_steps - len(ts), ts[-1])])
        idx = {b: i for i, b in enumerate(self.candidates)}
        w = [idx[int(b)] for b in np.asarray(bits.w_bits)]
        a = [idx[int(b)] for b in np.asarray(bits.a_bits)]
        n_gene = [n] if self.mode == "variable" else []
        g = np.concatenate([ts, n_gene, w, a]).astype(np.int32)
        return np.clip(g, self.lo, self.hi - 1)

    # -- sampling the box -----------------------------------------------------
    def random(self, key: jax.Array, num: int) -> jax.Array:
        """`num` genomes uniform in the box: int32[num, D]."""
        lo, hi = jnp.asarray(self.lo), jnp.asarray(self.hi)
        return jax.random.randint(key, (num, self.num_genes), lo, hi, jnp.int32)

    def mutate(self, key: jax.Array, g: jax.Array, prob) -> jax.Array:
        """Each gene redrawn uniformly in its range (a timestep inside its group)
        with probability `prob`. g: int32[..., D]."""
        k_mask, k_val = jax.random.split(key)
        fresh = self.random(k_val, int(np.prod(g.shape[:-1], dtype=int))).reshape(
            g.shape
        )
        return jnp.where(jax.random.uniform(k_mask, g.shape) < prob, fresh, g)

    # -- continuous strategies (evosax SimpleGA, CMA-ES) ------------------------
    def from_unit(self, u: jax.Array) -> jax.Array:
        """u in [0, 1)^D (any real, clipped) -> genome."""
        lo, hi = jnp.asarray(self.lo), jnp.asarray(self.hi)
        span = hi - lo
        return lo + jnp.clip(jnp.floor(u * span), 0, span - 1).astype(jnp.int32)

    def to_unit(self, g) -> jax.Array:
        lo, hi = jnp.asarray(self.lo), jnp.asarray(self.hi)
        return (jnp.asarray(g, jnp.float32) - lo + 0.5) / (hi - lo)
