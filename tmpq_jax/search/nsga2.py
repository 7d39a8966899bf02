"""NSGA-II (Deb et al. 2002, doi:10.1109/4235.996017): the whole front from one search.

A multi-objective strategy over (fitness, total BitOPs), both minimized, in
jax.numpy: it runs inside the engine's compiled ask/tell like every strategy.

* fast non-dominated sorting: rank 0 is the non-dominated set, rank r the
  non-dominated set once ranks < r are removed (`nondominated_rank`);
* crowding distance inside each rank, each objective normalized by the rank's
  span, its extremes infinite (`crowding_distance`);
* elitist (mu + lambda) survival: parents and offspring merged, the best
  `population` kept by (rank, larger crowding); a genome already in the pool
  counts only once (its copies go last), so copies never crowd the front out;
* variation: TMPQ-DM's operators (mutants, uniform crossovers, random refill,
  in the config's proportions), parents drawn by binary tournament on (rank,
  crowding) instead of from a top-k.

Generation 0 is the paper's first population, except that its random genomes are
spread over the cost axis (each one biased towards a random share of cheap genes),
so that the first front already spans the budget's range; with N searched, half of
them sit on the seed's grid (quad steps) at their own N, as a single-budget search
starts from its budget's quad steps. The budget stays the front's upper bound: the
engine repairs genomes above it before they are scored.
`search.objective=front` picks this strategy (`config.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tmpq_jax.search.config import SearchConfig
from tmpq_jax.search.space import GenomeSpace
from tmpq_jax.search.strategies import StrategyBase, register

_BIG = 1e30  # a non-finite objective (NaN, inf) counts as this: worst, but ordered


def dominates(f: jax.Array) -> jax.Array:
    """bool[N, N]: [i, j] when point i dominates point j (no worse in every
    objective, better in one). f: float[N, M], minimized."""
    le = jnp.all(f[:, None, :] <= f[None, :, :], axis=-1)
    lt = jnp.any(f[:, None, :] < f[None, :, :], axis=-1)
    return le & lt


def nondominated_rank(f: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """int32[N]: each point's front (0: non-dominated). Points not `valid` take
    rank N and never dominate anyone. f: float[N, M], minimized."""
    n = f.shape[0]
    valid = jnp.ones(n, bool) if valid is None else valid
    dom = dominates(f)

    def peel(carry):
        rank, r = carry
        open_ = rank < 0
        dominated = jnp.any(dom & open_[:, None], axis=0)
        return jnp.where(open_ & ~dominated, r, rank), r + 1

    start = jnp.where(valid, -1, n).astype(jnp.int32)
    rank, _ = jax.lax.while_loop(
        lambda c: jnp.any(c[0] < 0), peel, (start, jnp.int32(0))
    )
    return rank


def crowding_distance(f: jax.Array, rank: jax.Array) -> jax.Array:
    """float32[N]: Deb's crowding distance inside each rank (each objective's
    neighbour gap over the rank's span, summed; a rank's extremes: inf)."""
    n, m = f.shape
    seg = jnp.clip(rank, 0, n)
    dist = jnp.zeros(n, jnp.float32)
    for k in range(m):
        col = f[:, k]
        span = jax.ops.segment_max(col, seg, n + 1) - jax.ops.segment_min(
            col, seg, n + 1
        )
        order = jnp.lexsort((col, rank))
        fs, rs = col[order], rank[order]
        first = jnp.concatenate([jnp.array([True]), rs[1:] != rs[:-1]])
        last = jnp.concatenate([rs[:-1] != rs[1:], jnp.array([True])])
        gap = jnp.roll(fs, -1) - jnp.roll(fs, 1)
        s = span[seg[order]]
        inner = jnp.where(s > 0, gap / jnp.where(s > 0, s, 1.0), 0.0)
        part = jnp.where(first | last, jnp.inf, inner)
        dist = dist.at[order].add(part.astype(jnp.float32))
    return dist


def first_copies(genomes: jax.Array) -> jax.Array:
    """bool[N]: the first occurrence of each distinct genome (int[N, D])."""
    same = jnp.all(genomes[:, None, :] == genomes[None, :, :], axis=-1)
    earlier = jnp.tril(same, k=-1)
    return ~jnp.any(earlier, axis=1)


def survivors(genomes: jax.Array, f: jax.Array, num: int):
    """(indices of the `num` kept, rank, crowding) of a pool: by rank, then larger
    crowding; copies of a genome already in the pool last."""
    f = jnp.where(jnp.isfinite(f), f, _BIG).astype(jnp.float32)
    rank = nondominated_rank(f, first_copies(genomes))
    crowd = crowding_distance(f, rank)
    keep = jnp.lexsort((-crowd, rank))[:num]
    return keep, rank[keep], crowd[keep]


@struct.dataclass
class NSGA2State:
    population: jax.Array  # int32[P, D], the kept genomes as scored
    objectives: jax.Array  # float32[P, M]: (fitness, total BitOPs)
    rank: jax.Array  # int32[P]
    crowding: jax.Array  # float32[P]


def spread_random(space: GenomeSpace, key: jax.Array, num: int) -> jax.Array:
    """`num` random genomes spread over the cost axis: genome i draws its cost
    genes (bits; the step count in `variable` mode) around the i-th of `num`
    stratified shares of cheapness, its timesteps uniformly (in `variable` mode,
    the even i take the seed's grid at their step count). int32[num, D]."""
    k_share, k_noise, k_rand = jax.random.split(key, 3)
    share = (jnp.arange(num) + jax.random.uniform(k_share, (num,))) / num
    u = share[:, None] + 0.15 * jax.random.normal(k_noise, (num, space.num_genes))
    cheap_high = np.zeros(space.num_genes, bool)  # bit index up: fewer bits
    cheap_high[space.w_slice] = cheap_high[space.a_slice] = True
    cost_gene = cheap_high.copy()
    if space.mode == "variable":  # the step count: down is cheaper
        cost_gene[space.num_steps] = True
    u = jnp.where(jnp.asarray(cheap_high), u, 1.0 - u)
    biased = space.from_unit(jnp.clip(u, 0.0, 1.0 - 1e-6))
    g = jnp.where(jnp.asarray(cost_gene), biased, space.random(k_rand, num))
    if space.grids is None:
        return g
    # variable mode: every other genome takes the seed's kind of grid at its own
    # step count, so cheap points start from good timesteps, not random ones
    n = space.num_steps
    on_grid = jnp.asarray(space.grids)[g[:, n]]
    even = (jnp.arange(num) % 2 == 0)[:, None]
    return g.at[:, :n].set(jnp.where(even, on_grid, g[:, :n]))


@register("nsga2")
class NSGA2Strategy(StrategyBase):
    """NSGA-II over (fitness, total BitOPs); the state is the kept population."""

    objectives = 2

    def __init__(self, cfg: SearchConfig, space: GenomeSpace):
        super().__init__(cfg, space)
        self.num_mutants = min(round(cfg.mutant_frac * cfg.population), cfg.offspring)
        self.num_crossovers = min(
            round(cfg.crossover_frac * cfg.population),
            cfg.offspring - self.num_mutants,
        )

    def first(self, key):
        k_pop, k_spread = jax.random.split(key)
        g = self.initial(k_pop)
        start = 1 + self.num_initial_mutants  # the seed and its mutants stay
        spread = spread_random(self.space, k_spread, self.num_first - start)
        g = jnp.concatenate([g[:start], spread]).astype(jnp.int32)
        return g, g

    def _survive(self, genomes, f) -> NSGA2State:
        keep, rank, crowd = survivors(genomes, f, self.num_first)
        return NSGA2State(
            genomes[keep].astype(jnp.int32), f[keep].astype(jnp.float32), rank, crowd
        )

    def start(self, key, raw, fitness):
        return self._survive(raw, fitness)

    def _parents(self, key, state: NSGA2State, num: int) -> jax.Array:
        """Binary tournaments: lower rank wins, then larger crowding."""
        a, b = jax.random.randint(key, (2, num), 0, state.rank.shape[0])
        ra, rb = state.rank[a], state.rank[b]
        a_wins = (ra < rb) | ((ra == rb) & (state.crowding[a] >= state.crowding[b]))
        return state.population[jnp.where(a_wins, a, b)]

    def ask(self, key, state):
        k_mp, k_mut, k_ca, k_cb, k_cm, k_rand = jax.random.split(key, 6)
        mutants = self.space.mutate(
            k_mut, self._parents(k_mp, state, self.num_mutants), self.cfg.mutation_prob
        )
        pa = self._parents(k_ca, state, self.num_crossovers)
        pb = self._parents(k_cb, state, self.num_crossovers)
        crosses = jnp.where(jax.random.uniform(k_cm, pa.shape) < 0.5, pb, pa)
        rest = self.num_next - self.num_mutants - self.num_crossovers
        g = jnp.concatenate([mutants, crosses, self.space.random(k_rand, rest)])
        g = g.astype(jnp.int32)
        return g, g, state

    def tell(self, key, raw, fitness, state):
        pool = jnp.concatenate([state.population, raw.astype(jnp.int32)])
        f = jnp.concatenate([state.objectives, fitness.astype(jnp.float32)])
        return self._survive(pool, f)
