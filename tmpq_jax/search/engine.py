"""One compiled program per generation: ask -> repair -> evaluate -> tell -> archive.

`SearchState` is a single pytree (the seed, generation count, the strategy's
state, the archive of every evaluated genome), so a checkpoint is one orbax save
and a resume restores exactly what an uninterrupted run would hold. Keys come from
`fold_in(key(seed), generation)`, never from the host: a resumed search draws the
same genomes. The seed is traced, not baked in, so every seed runs the same
compiled programs (and hits the persistent compilation cache). Generation 0 (the
seeded first population) is its own program; every later generation runs the same
compiled `next_generation`. With racing (`search.race_samples`, `racing.py`) a
generation scores every candidate on a prefix of the noise batch and the best of
them on all of it, inside the same program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tmpq_jax.search import budget as budget_lib
from tmpq_jax.search import racing, sharding
from tmpq_jax.search.config import SearchConfig
from tmpq_jax.search.fitness import Assets, Problem
from tmpq_jax.search.strategies import Strategy


@struct.dataclass
class Archive:
    """Every evaluated genome; row g = generation g (padded to the population)."""

    genomes: jax.Array  # int32[G, P, D] (after repair: what was scored)
    fid: jax.Array  # float32[G, P]
    fitness: jax.Array  # float32[G, P] (fid + budget penalty)
    bitops: jax.Array  # float32[G, P] total over the schedule
    count: jax.Array  # int32[G]: valid entries of each row
    # int32[G, P]: the samples each was scored on (num_samples; a candidate raced
    # out: race_samples, its `fid` a prefix score; search/racing.py)
    samples: jax.Array

    @classmethod
    def empty(cls, generations: int, population: int, num_genes: int) -> Archive:
        g, p = generations, population
        return cls(
            genomes=jnp.zeros((g, p, num_genes), jnp.int32),
            fid=jnp.full((g, p), jnp.inf, jnp.float32),
            fitness=jnp.full((g, p), jnp.inf, jnp.float32),
            bitops=jnp.zeros((g, p), jnp.float32),
            count=jnp.zeros((g,), jnp.int32),
            samples=jnp.zeros((g, p), jnp.int32),
        )

    def put(self, row, genomes, fid, fitness, bitops, samples) -> Archive:
        """Row `row` (may be traced) := these; fewer than P entries leave padding."""
        return Archive(
            genomes=_put_prefix(self.genomes, row, genomes),
            fid=_put_prefix(self.fid, row, fid),
            fitness=_put_prefix(self.fitness, row, fitness),
            bitops=_put_prefix(self.bitops, row, bitops),
            count=self.count.at[row].set(genomes.shape[0]),
            samples=_put_prefix(self.samples, row, samples),
        )


def _put_prefix(table, row, values):
    """table[row, :len(values)] = values."""
    current = jax.lax.dynamic_index_in_dim(table, row, keepdims=False)
    new_row = current.at[: values.shape[0]].set(values.astype(table.dtype))
    return jax.lax.dynamic_update_index_in_dim(table, new_row, row, axis=0)


def _strong(tree):
    """Strips weak types (evosax starts from Python scalars): a state restored from
    a checkpoint then has exactly the types of a live one, so resuming never
    recompiles the generation program."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), tree)


@struct.dataclass
class SearchState:
    seed: jax.Array  # int32: the search's seed (config `search.seed`)
    generation: jax.Array  # int32: generations done
    strategy: Any
    archive: Archive


@dataclasses.dataclass(frozen=True, eq=False)
class Engine:
    cfg: SearchConfig
    problem: Problem
    strategy: Strategy
    budget: float  # total BitOPs over the schedule
    # The devices a generation runs on (`sharding.search_mesh`); None: the default
    # device, unsharded.
    mesh: jax.sharding.Mesh | None = None

    @property
    def replicated(self) -> jax.sharding.Sharding:
        """Where a search state lives: every device of the mesh (checkpoints are
        restored there, so a restored state never recompiles the program)."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return sharding.replicated(self.mesh)

    @staticmethod
    def _key(seed, generation, stream: int):
        base = jax.random.fold_in(jax.random.key(seed), generation)
        return jax.random.fold_in(base, stream)

    def _score(self, assets: Assets, genomes: jax.Array) -> jax.Array:
        if self.mesh is None:
            return self.problem.population_fid(assets, genomes)
        return sharding.population_fid(self.problem, self.mesh, assets, genomes)

    def evaluate(self, assets: Assets, genomes: jax.Array, forced=()):
        """(genomes as scored, fid, fitness, total BitOPs, samples scored on each).
        With racing (`race_samples` > 0) the rows `forced` are fully scored too."""
        space, reg, cfg = self.problem.space, self.problem.registry, self.cfg
        if cfg.constraint == "repair":
            genomes = jax.vmap(lambda g: budget_lib.repair(space, reg, g, self.budget))(
                genomes
            )
        bitops = jax.vmap(lambda g: budget_lib.genome_cost(space, reg, g)[0])(genomes)
        penalize = lambda f, b: budget_lib.penalized(  # noqa: E731
            f, b, self.budget, cfg.penalty_weight
        )
        n = genomes.shape[0]
        keep = racing.num_kept(n, cfg.race_keep, cfg.num_elites)
        if racing.generation_samples(cfg, n, len(forced)) < n * cfg.num_samples:
            fid, fitness, samples = racing.race(
                self._score, penalize, assets, genomes, bitops,
                cfg.race_samples, keep, cfg.num_samples, forced,
            )  # fmt: skip
            return genomes, fid, fitness, bitops, samples
        fid = self._score(assets, genomes)
        samples = jnp.full((n,), cfg.num_samples, jnp.int32)
        return genomes, fid, penalize(fid, bitops), bitops, samples

    def _told(self, fitness: jax.Array, bitops: jax.Array) -> jax.Array:
        """What the strategy learns from: the fitness, or (fitness, total BitOPs)
        per genome for a strategy of two objectives (a front)."""
        if getattr(self.strategy, "objectives", 1) == 1:
            return fitness
        return jnp.stack([fitness, bitops], axis=-1)

    def first_generation(self, assets: Assets, seed: jax.Array) -> SearchState:
        """`seed`: int32 scalar (traced: one program serves every seed)."""
        seed = jnp.asarray(seed, jnp.int32)
        raw, genomes = self.strategy.first(self._key(seed, 0, 0))
        # Row 0 is the seed genome: a race always scores it in full.
        genomes, fid, fitness, bitops, samples = self.evaluate(assets, genomes, (0,))
        if self.strategy.learns_repair:
            raw = genomes
        told = self._told(fitness, bitops)
        state = self.strategy.start(self._key(seed, 0, 1), raw, told)
        archive = Archive.empty(
            self.cfg.generations, self.cfg.population, genomes.shape[1]
        )
        archive = archive.put(0, genomes, fid, fitness, bitops, samples)
        return _strong(SearchState(seed, jnp.int32(1), state, archive))

    def next_generation(self, assets: Assets, s: SearchState) -> SearchState:
        gen = s.generation
        raw, genomes, state = self.strategy.ask(self._key(s.seed, gen, 0), s.strategy)
        genomes, fid, fitness, bitops, samples = self.evaluate(assets, genomes)
        if self.strategy.learns_repair:
            raw = genomes
        told = self._told(fitness, bitops)
        state = self.strategy.tell(self._key(s.seed, gen, 1), raw, told, state)
        archive = s.archive.put(gen, genomes, fid, fitness, bitops, samples)
        return _strong(SearchState(s.seed, gen + 1, state, archive))

    @functools.cached_property
    def programs(self):
        """(first, next) jitted once per engine; `next` donates the state it advances
        (tests read `next._cache_size()` to assert a single compile). Their state
        comes out replicated over the mesh, as a restored one is placed."""
        out = None if self.mesh is None else self.replicated
        return (
            jax.jit(self.first_generation, out_shardings=out),
            jax.jit(self.next_generation, donate_argnums=1, out_shardings=out),
        )
