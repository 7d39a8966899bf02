"""Strategies plug in by name: a strategy registered here (pure random search, a
few lines) runs through the unchanged engine and host loop, resumes exactly, and
the built-in ones are the registry's. The fitness is a toy (distance to the
cheapest genome) so that the programs compile in seconds; the real fitness is
tests/test_search_engine.py's."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_search_engine import SEARCH, tiny_parts

from tmpq_jax.errors import UserError
from tmpq_jax.search import SearchConfig, SearchRunConfig, build_setup, run_generations
from tmpq_jax.search.strategies import (
    REGISTRY,
    RandomSearch,
    StrategyBase,
    make_strategy,
    register,
)


@register("toy_random")
class ToyRandom(StrategyBase):
    """Pure random search: uniform genomes of the box every generation; the state
    is the best fitness seen."""

    def first(self, key):
        g = self.space.random(key, self.num_first)
        return g, g

    def start(self, key, raw, fitness):
        return fitness.min()

    def ask(self, key, state):
        g = self.space.random(key, self.num_next)
        return g, g, state

    def tell(self, key, raw, fitness, state):
        return jnp.minimum(state, fitness.min())


@dataclasses.dataclass(frozen=True, eq=False)
class ToyProblem:
    """The engine's view of a problem, with a cheap fitness."""

    space: object
    registry: object

    def population_fid(self, assets, genomes, axis=None):
        target = jnp.asarray(self.space.hi - 1)
        return jnp.sum(jnp.abs(genomes - target), axis=-1).astype(jnp.float32)


def test_a_registered_strategy_runs_through_the_engine(
    tiny_cfg, tiny_params, tmp_path
):
    lm, reg, net, stats = tiny_parts(tiny_cfg, tiny_params)
    run = SearchRunConfig(search=SearchConfig(**{**SEARCH, "strategy": "toy_random"}))
    setup = build_setup(run, lm, reg, None, None, net, stats)
    assert isinstance(setup.engine.strategy, ToyRandom)  # built by name
    problem = ToyProblem(setup.space, setup.registry)
    setup = dataclasses.replace(
        setup, engine=dataclasses.replace(setup.engine, problem=problem)
    )
    full = run_generations(setup, tmp_path / "full", progress=False)
    a = full.archive
    np.testing.assert_array_equal(a.count, [4, 3, 3])
    s = setup.space
    g = np.asarray(a.genomes)
    for row, n in enumerate(np.asarray(a.count)):
        assert ((g[row, :n] >= s.lo) & (g[row, :n] < s.hi)).all()
    fit = np.asarray(a.fitness)
    assert float(full.strategy) == fit[np.isfinite(fit)].min()  # its state came back
    run_generations(setup, tmp_path / "resumed", progress=False, stop_after=1)
    resumed = run_generations(setup, tmp_path / "resumed", progress=False)
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(x, y)
    assert setup.engine.programs[1]._cache_size() == 1


def test_the_registry_names_the_strategies():
    assert REGISTRY["random"] is RandomSearch and REGISTRY["toy_random"] is ToyRandom
    with pytest.raises(ValueError, match="already registered"):
        register("random")(ToyRandom)
    assert register("random")(RandomSearch) is RandomSearch  # the same class: fine
    cfg = types.SimpleNamespace(strategy="hillclimb")  # past the config's own check
    with pytest.raises(UserError, match="search.strategy='hillclimb': use one of"):
        make_strategy(cfg, None)
