"""Search strategies: one class each, behind one small protocol, named in a registry.

* `tmpq_ga`: TMPQ-DM's discrete GA (`ga.py`).
* `simple_ga`, `cma_es`: evosax's built-ins on continuous genes in the unit box,
  decoded with `GenomeSpace.from_unit` (floor into each gene's range).
* `random`: uniform genomes of the box (the seed genome is in generation 0).
* `nsga2`: NSGA-II over (fitness, total BitOPs), the front in one search
  (`nsga2.py`; `search.objective=front`).

`search.strategy` names a class of `REGISTRY`; `make_strategy` builds it as
`cls(cfg, space)`. A new strategy is a class with the four methods of `Strategy`
(most start from `StrategyBase`), registered under a name:

    @register("my_search")
    class MySearch(StrategyBase):
        def start(self, key, raw, fitness): ...
        def ask(self, key, state): ...
        def tell(self, key, raw, fitness, state): ...

The engine (`engine.py`) calls only these methods, so it needs no change.

Every strategy evaluates the same numbers: generation 0 scores `population`
genomes (the seed genome, mutations of it and random ones; the paper's first
population), every later one `population - num_elites`. So any two strategies
with the same config spend the same number of evaluations.

`first` / `start` build generation 0; `ask` / `tell` every later one. `raw` is what
the strategy itself works on (int genomes, or unit-box reals); `genomes` are the
decoded int genomes. A strategy with `learns_repair` learns from the genomes as
scored (after repair); the others are told their own `raw`. Every method is traced
inside the engine's compiled programs: keys come from the engine, the state is a
pytree (it is checkpointed with the search), and shapes are fixed per config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import CMA_ES, SimpleGA

from tmpq_jax.errors import UserError
from tmpq_jax.search.config import SearchConfig
from tmpq_jax.search.ga import TmpqGA, initial_population
from tmpq_jax.search.space import GenomeSpace


class Strategy(Protocol):
    """What the engine calls. `raw`: the strategy's own encoding of a population;
    `genomes`: int32[n, D] in the box; `state`: any pytree."""

    learns_repair: bool  # told the genomes as scored (repaired), not its raw ones
    # 1: told the fitness, float[n]; 2: told (fitness, total BitOPs), float[n, 2]
    # (a front: `search.objective=front`, e.g. `nsga2.py`).
    objectives: int

    def first(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Generation 0: (raw, genomes) of `population` genomes."""
        ...

    def start(self, key: jax.Array, raw: jax.Array, fitness: jax.Array) -> Any:
        """The state after generation 0 was scored (`fitness`: lower is better)."""
        ...

    def ask(self, key: jax.Array, state: Any) -> tuple[jax.Array, jax.Array, Any]:
        """A later generation: (raw, genomes, state) of `population - num_elites`."""
        ...

    def tell(
        self, key: jax.Array, raw: jax.Array, fitness: jax.Array, state: Any
    ) -> Any:
        """The state after that generation was scored."""
        ...


REGISTRY: dict[str, Callable[[SearchConfig, GenomeSpace], Strategy]] = {}


def register(name: str):
    """Class decorator: `search.strategy=name` builds this class as `cls(cfg, space)`."""

    def add(cls):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered")
        REGISTRY[name] = cls
        return cls

    return add


def make_strategy(cfg: SearchConfig, space: GenomeSpace) -> Strategy:
    """The strategy `cfg.strategy` names, for this genome box."""
    if cfg.strategy not in REGISTRY:
        raise UserError(
            f"search.strategy={cfg.strategy!r}: use one of {list(REGISTRY)}."
        )
    return REGISTRY[cfg.strategy](cfg, space)


class StrategyBase:
    """The common parts: the config and box, the evaluation counts, and generation 0
    as the paper's first population (int genomes, `raw` == `genomes`)."""

    learns_repair = True
    objectives = 1

    def __init__(self, cfg: SearchConfig, space: GenomeSpace):
        self.cfg, self.space = cfg, space

    @property
    def num_first(self) -> int:
        return self.cfg.population

    @property
    def num_next(self) -> int:
        return self.cfg.offspring

    @property
    def num_initial_mutants(self) -> int:
        """Mutations of the seed genome in generation 0 (the rest is random)."""
        c = self.cfg
        return min(round(c.init_mutant_frac * c.population), c.population - 1)

    def initial(self, key) -> jax.Array:
        """int32[population, D]: the seed genome, its mutants, random genomes."""
        c = self.cfg
        return initial_population(
            self.space, key, c.population, self.num_initial_mutants, c.mutation_prob
        )

    def first(self, key) -> tuple[jax.Array, jax.Array]:
        g = self.initial(key)
        return g, g


@register("tmpq_ga")
class TmpqGAStrategy(StrategyBase):
    """TMPQ-DM's GA: elites kept with their scores, mutants, crossovers, refill."""

    def __init__(self, cfg: SearchConfig, space: GenomeSpace):
        super().__init__(cfg, space)
        p = cfg.population
        mutants = min(round(cfg.mutant_frac * p), cfg.offspring)
        self.algo = TmpqGA(
            space,
            population_size=p,
            num_elites=cfg.num_elites,
            num_mutants=mutants,
            num_crossovers=min(round(cfg.crossover_frac * p), cfg.offspring - mutants),
            mutation_prob=cfg.mutation_prob,
        )
        self.params = self.algo.default_params

    def start(self, key, raw, fitness):
        return self.algo.init(key, raw, fitness, self.params)

    def ask(self, key, state):
        raw, state = self.algo.ask(key, state, self.params)
        return raw, raw, state

    def tell(self, key, raw, fitness, state):
        state, _ = self.algo.tell(key, raw, fitness, state, self.params)
        return state


@register("random")
class RandomSearch(StrategyBase):
    """Uniform genomes of the box; generation 0 is the seed genome and random ones.
    The state only counts generations."""

    @property
    def num_initial_mutants(self) -> int:
        return 0

    def start(self, key, raw, fitness):
        return jnp.int32(0)

    def ask(self, key, state):
        g = self.space.random(key, self.num_next)
        return g, g, state

    def tell(self, key, raw, fitness, state):
        return state + 1


class UnitBoxStrategy(StrategyBase):
    """An evosax algorithm on reals in the unit box (`GenomeSpace.to_unit` /
    `from_unit`), told its own reals (it does not learn the repair). Subclasses
    build `self.algo` and `self.params` and say how generation 0 starts it."""

    learns_repair = False

    def first(self, key):
        g = self.initial(key)
        return self.space.to_unit(g), g

    def _best(self, fitness):
        """The `num_next` best of generation 0, best first."""
        return jnp.argsort(fitness)[: self.num_next]

    def ask(self, key, state):
        raw, state = self.algo.ask(key, state, self.params)
        return raw, self.space.from_unit(raw), state

    def tell(self, key, raw, fitness, state):
        state, _ = self.algo.tell(key, raw, fitness, state, self.params)
        return state


@register("simple_ga")
class SimpleGAStrategy(UnitBoxStrategy):
    """evosax's SimpleGA (crossover rate 0.5, mutation std `es_std`), started from
    the best of generation 0."""

    def __init__(self, cfg: SearchConfig, space: GenomeSpace):
        super().__init__(cfg, space)
        self.algo = SimpleGA(
            population_size=cfg.offspring,
            solution=jnp.zeros(space.num_genes, jnp.float32),
            std_schedule=optax.constant_schedule(cfg.es_std),
        )
        self.params = self.algo.default_params.replace(crossover_rate=0.5)

    def start(self, key, raw, fitness):
        best = self._best(fitness)
        return self.algo.init(key, raw[best], fitness[best], self.params)


@register("cma_es")
class CMAESStrategy(UnitBoxStrategy):
    """evosax's CMA-ES (initial std `es_std`), centred on the best of generation 0."""

    def __init__(self, cfg: SearchConfig, space: GenomeSpace):
        super().__init__(cfg, space)
        self.algo = CMA_ES(
            population_size=cfg.offspring,
            solution=jnp.zeros(space.num_genes, jnp.float32),
        )
        self.params = self.algo.default_params.replace(std_init=jnp.asarray(cfg.es_std))

    def start(self, key, raw, fitness):
        return self.algo.init(key, raw[self._best(fitness)[0]], self.params)


# Strategies kept in modules of their own register when imported.
from tmpq_jax.search import nsga2  # noqa: E402, F401
