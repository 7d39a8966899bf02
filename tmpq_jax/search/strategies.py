"""Search strategies behind one interface, chosen by `search.strategy`.

* `tmpq_ga`: TMPQ-DM's discrete GA (`ga.py`).
* `simple_ga`, `cma_es`: evosax's built-ins on continuous genes in the unit box,
  decoded with `GenomeSpace.from_unit` (floor into each gene's range).
* `random`: uniform genomes of the box (the seed genome is in generation 0).

Every strategy evaluates the same numbers: generation 0 scores `population`
genomes (the seed genome, mutations of it and random ones; the paper's first
population), every later one `population - num_elites`. So any two strategies
with the same config spend the same number of evaluations.

`first` / `start` build generation 0; `ask` / `tell` every later one. `raw` is what
the strategy itself works on (int genomes, or unit-box reals); `genomes` are the
decoded int genomes. Discrete strategies learn from repaired genomes (`learns_repair`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import CMA_ES, SimpleGA

from tmpq_jax.search.config import SearchConfig
from tmpq_jax.search.ga import TmpqGA, initial_population
from tmpq_jax.search.space import GenomeSpace


@dataclasses.dataclass(frozen=True, eq=False)
class Strategy:
    cfg: SearchConfig
    space: GenomeSpace
    algo: Any = None
    params: Any = None  # the evosax algorithm's params

    @property
    def num_first(self) -> int:
        return self.cfg.population

    @property
    def num_next(self) -> int:
        return self.cfg.offspring

    @property
    def learns_repair(self) -> bool:
        return self.cfg.strategy in ("tmpq_ga", "random")

    def _initial(self, key):
        c = self.cfg
        mutants = round(c.init_mutant_frac * c.population)
        mutants = min(mutants, c.population - 1) if c.strategy != "random" else 0
        return initial_population(
            self.space, key, c.population, mutants, c.mutation_prob
        )

    # -- generation 0 ---------------------------------------------------------
    def first(self, key) -> tuple[jax.Array, jax.Array]:
        g = self._initial(key)
        if self.cfg.strategy in ("simple_ga", "cma_es"):
            return self.space.to_unit(g), g
        return g, g

    def start(self, key, raw, fitness) -> Any:
        name = self.cfg.strategy
        if name == "tmpq_ga":
            return self.algo.init(key, raw, fitness, self.params)
        if name == "random":
            return jnp.int32(0)
        best = jnp.argsort(fitness)[: self.num_next]
        if name == "simple_ga":
            return self.algo.init(key, raw[best], fitness[best], self.params)
        return self.algo.init(key, raw[best[0]], self.params)  # cma_es

    # -- later generations ----------------------------------------------------
    def ask(self, key, state) -> tuple[jax.Array, jax.Array, Any]:
        name = self.cfg.strategy
        if name == "random":
            g = self.space.random(key, self.num_next)
            return g, g, state
        raw, state = self.algo.ask(key, state, self.params)
        if name == "tmpq_ga":
            return raw, raw, state
        return raw, self.space.from_unit(raw), state

    def tell(self, key, raw, fitness, state) -> Any:
        if self.cfg.strategy == "random":
            return state + 1
        state, _ = self.algo.tell(key, raw, fitness, state, self.params)
        return state


def make_strategy(cfg: SearchConfig, space: GenomeSpace) -> Strategy:
    d = jnp.zeros(space.num_genes, jnp.float32)
    if cfg.strategy == "tmpq_ga":
        p = cfg.population
        algo = TmpqGA(
            space,
            population_size=p,
            num_elites=cfg.num_elites,
            num_mutants=min(round(cfg.mutant_frac * p), cfg.offspring),
            num_crossovers=min(
                round(cfg.crossover_frac * p),
                cfg.offspring - min(round(cfg.mutant_frac * p), cfg.offspring),
            ),
            mutation_prob=cfg.mutation_prob,
        )
    elif cfg.strategy == "simple_ga":
        algo = SimpleGA(
            population_size=cfg.offspring,
            solution=d,
            std_schedule=optax.constant_schedule(cfg.es_std),
        )
    elif cfg.strategy == "cma_es":
        algo = CMA_ES(population_size=cfg.offspring, solution=d)
    else:
        return Strategy(cfg, space)
    params = algo.default_params
    if cfg.strategy == "simple_ga":
        params = params.replace(crossover_rate=0.5)
    elif cfg.strategy == "cma_es":
        params = params.replace(std_init=jnp.asarray(cfg.es_std))
    return Strategy(cfg, space, algo, params)
