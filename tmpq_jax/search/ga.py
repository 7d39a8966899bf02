"""TMPQ-DM's genetic algorithm on evosax's population-based base class.

Each generation keeps the top-k elites with their scores and evaluates only new
genomes: mutations of elites (each gene redrawn inside its range with probability
p; a timestep inside its own group), uniform crossovers of two elites, and random
refill (arXiv 2404.09532: population 50 = top 10 + 25 mutations + 10 crossovers +
5 random). Genomes are int32 vectors in a `GenomeSpace` box; evosax's
ask/tell/metrics machinery is used unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from evosax.algorithms.population_based.base import Params as PBParams
from evosax.algorithms.population_based.base import PopulationBasedAlgorithm
from evosax.algorithms.population_based.base import State as PBState
from flax import struct

from tmpq_jax.search.space import GenomeSpace


@struct.dataclass
class State(PBState):
    pass


@struct.dataclass
class Params(PBParams):
    mutation_prob: float


class TmpqGA(PopulationBasedAlgorithm):
    """`population_size` is the kept population; `ask` returns the
    `population_size - num_elites` new genomes, `tell` merges them with the elites."""

    def __init__(
        self,
        space: GenomeSpace,
        population_size: int,
        num_elites: int,
        num_mutants: int,
        num_crossovers: int,
        mutation_prob: float = 0.25,
    ):
        super().__init__(population_size, jnp.zeros(space.num_genes, jnp.int32))
        if num_elites + num_mutants + num_crossovers > population_size:
            raise ValueError("elites + mutants + crossovers exceed the population")
        self.space = space
        self._num_elites = num_elites
        self.num_mutants = num_mutants
        self.num_crossovers = num_crossovers
        self.mutation_prob = mutation_prob

    @property
    def num_elites(self) -> int:
        return self._num_elites

    @property
    def num_offspring(self) -> int:
        return self.population_size - self._num_elites

    @property
    def _default_params(self) -> Params:
        return Params(mutation_prob=self.mutation_prob)

    def _init(self, key, params) -> State:
        p, d = self.population_size, self.num_dims
        return State(
            population=jnp.zeros((p, d), jnp.int32),
            fitness=jnp.full((p,), jnp.inf),
            best_solution=jnp.zeros((d,), jnp.int32),
            best_fitness=jnp.inf,
            generation_counter=0,
        )

    def _elites(self, state: State):
        order = jnp.argsort(state.fitness)[: self._num_elites]
        return state.population[order], state.fitness[order]

    def _ask(self, key, state: State, params: Params):
        elites, _ = self._elites(state)
        k_mp, k_mut, k_c1, k_c2, k_cm, k_rand = jax.random.split(key, 6)
        k = self._num_elites
        parents = elites[jax.random.randint(k_mp, (self.num_mutants,), 0, k)]
        mutants = self.space.mutate(k_mut, parents, params.mutation_prob)
        pa = elites[jax.random.randint(k_c1, (self.num_crossovers,), 0, k)]
        pb = elites[jax.random.randint(k_c2, (self.num_crossovers,), 0, k)]
        mask = jax.random.uniform(k_cm, pa.shape) < 0.5
        crosses = jnp.where(mask, pb, pa)
        num_random = self.num_offspring - self.num_mutants - self.num_crossovers
        rand = self.space.random(k_rand, num_random)
        return jnp.concatenate([mutants, crosses, rand]).astype(jnp.int32), state

    def _tell(self, key, population, fitness, state: State, params: Params) -> State:
        elites, elite_fit = self._elites(state)
        return state.replace(
            population=jnp.concatenate([elites, population.astype(jnp.int32)]),
            fitness=jnp.concatenate([elite_fit, fitness]),
        )


def initial_population(
    space: GenomeSpace, key: jax.Array, size: int, num_mutants: int, prob: float
) -> jax.Array:
    """The paper's first population: the seed genome (quad steps, uniform bits),
    `num_mutants` mutations of it, random genomes for the rest. int32[size, D]."""
    k_mut, k_rand = jax.random.split(key)
    seed = jnp.asarray(space.seed)[None]
    mutants = space.mutate(k_mut, jnp.repeat(seed, num_mutants, axis=0), prob)
    rand = space.random(k_rand, size - 1 - num_mutants)
    return jnp.concatenate([seed, mutants, rand]).astype(jnp.int32)
