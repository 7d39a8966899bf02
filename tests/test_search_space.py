"""The genome box, the budget (repair, penalty, refusal) and the strategies, on toy
fitness functions: no model is compiled here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.diffusion.schedules import quad_group_bounds, quad_timesteps
from tmpq_jax.errors import UserError
from tmpq_jax.quant import cost, unet_registry
from tmpq_jax.quant.supernet import QuantBits
from tmpq_jax.search import budget as B
from tmpq_jax.search.config import SearchConfig
from tmpq_jax.search.space import GenomeSpace
from tmpq_jax.search.strategies import make_strategy


@pytest.fixture(scope="module")
def reg(tiny_cfg):
    return unet_registry(tiny_cfg)


def space(reg, **kw):
    return GenomeSpace.build(SearchConfig(**kw), reg)


def test_grouped_box_seed_and_sampling(reg, key):
    s = space(reg)
    edges = quad_group_bounds(10)
    np.testing.assert_array_equal(s.lo[:10], edges[:-1])
    np.testing.assert_array_equal(s.hi[:10], edges[1:])
    d = s.decode(jnp.asarray(s.seed))
    np.testing.assert_array_equal(d.timesteps, quad_timesteps(10))
    assert int(d.num_steps) == 10
    np.testing.assert_array_equal(d.bits.w_bits, QuantBits.uniform(reg, 6, 6).w_bits)
    for g in (s.random(key, 64), s.mutate(key, jnp.tile(s.seed, (64, 1)), 0.5)):
        assert ((g >= s.lo) & (g < s.hi)).all()
    u = jnp.array([-3.0, 0.0, 0.999999, 1.0, 7.0])[:, None] * jnp.ones(s.num_genes)
    g = s.from_unit(u)
    assert ((g >= s.lo) & (g < s.hi)).all()
    np.testing.assert_array_equal(s.from_unit(s.to_unit(s.seed)), s.seed)
    # the softmax operand's gene is frozen: the pinned width makes it inert
    pinned = reg.pinned_lhs_bits > 0
    assert (
        pinned.any() and (s.hi[s.a_slice][pinned] - s.lo[s.a_slice][pinned] == 1).all()
    )


def test_encode_decode_round_trip(reg):
    s = space(reg)
    bits = QuantBits.from_names(reg, {reg.names[0]: (5, 7)}, default=(8, 6))
    ts = np.array([3, 20, 50, 100, 200, 300, 400, 500, 700, 900])
    d = s.decode(jnp.asarray(s.encode(ts, bits)))
    np.testing.assert_array_equal(d.timesteps, ts)
    np.testing.assert_array_equal(d.bits.w_bits, bits.w_bits)
    keep = reg.pinned_lhs_bits == 0  # inert genes decode to candidate 0
    np.testing.assert_array_equal(np.asarray(d.bits.a_bits)[keep], bits.a_bits[keep])


def test_variable_mode_pads_with_repeats(reg):
    s = space(reg, timestep_mode="variable", num_steps=5, min_steps=2)
    g = s.seed.copy()
    g[:5] = [700, 10, 300, 999, 5]
    g[5] = 3  # first three genes active: 700, 10, 300
    d = s.decode(jnp.asarray(g))
    np.testing.assert_array_equal(d.timesteps, [10, 300, 700, 700, 700])
    assert int(d.num_steps) == 3
    free = space(reg, timestep_mode="free")
    g = free.seed.copy()
    g[:10] = g[:10][::-1]
    np.testing.assert_array_equal(
        free.decode(jnp.asarray(g)).timesteps, quad_timesteps(10)
    )


def test_frozen_spaces(reg):
    p = space(reg, space="precision")
    assert (p.hi[:10] - p.lo[:10] == 1).all() and (
        p.lo[:10] == quad_timesteps(10)
    ).all()
    assert p.searched[p.w_slice].all()
    t = space(reg, space="timesteps", seed_w_bits=7, seed_a_bits=5)
    assert not t.searched[10:].any() and t.searched[:10].all()
    d = t.decode(jnp.asarray(t.seed))
    np.testing.assert_array_equal(d.bits.w_bits, QuantBits.uniform(reg, 7, 5).w_bits)


def test_repair_fits_budget_lowering_costliest_first(reg):
    s = space(reg)
    budget = B.budget_bitops(reg, 6, 6, 10)
    g = jnp.asarray(np.where(s.searched, s.lo, s.lo))  # all genes at index 0: W8A8
    g = g.at[:10].set(jnp.asarray(s.seed[:10]))
    assert B.genome_cost(s, reg, g)[0] > budget
    r = B.repair(s, reg, g, budget)
    total = B.genome_cost(s, reg, r)[0]
    assert cost.within_budget(total, budget)
    # minimal: undoing any single lowered gene breaks the budget again
    changed = np.flatnonzero(np.asarray(r != g))
    assert changed.size and all(r[i] > g[i] for i in changed)
    assert (np.asarray(r)[~s.searched] == np.asarray(g)[~s.searched]).all()
    last = changed[
        np.argmax([float(B.genome_cost(s, reg, r.at[i].add(-1))[0]) for i in changed])
    ]
    assert not cost.within_budget(B.genome_cost(s, reg, r.at[last].add(-1))[0], budget)
    # the first move lowers a gene of the costliest layer
    d = s.decode(g)
    costliest = int(jnp.argmax(cost.layer_bitops(d.bits, reg)))
    one = B.repair(s, reg, g, B.genome_cost(s, reg, g)[0] * 0.999999)
    moved = np.flatnonzero(np.asarray(one != g))
    assert len(moved) == 1 and moved[0] in (
        s.w_slice.start + costliest,
        s.a_slice.start + costliest,
    )
    # a feasible genome is left alone
    np.testing.assert_array_equal(B.repair(s, reg, jnp.asarray(s.seed), budget), s.seed)


def test_variable_repair_drops_steps_when_bits_are_frozen(reg):
    s = space(
        reg,
        space="timesteps",
        timestep_mode="variable",
        num_steps=10,
        seed_w_bits=8,
        seed_a_bits=8,
    )
    budget = B.budget_bitops(reg, 6, 6, 10)
    r = B.repair(s, reg, jnp.asarray(s.seed), budget)
    n = int(s.decode(r).num_steps)
    per_step = float(cost.uniform_bitops(reg, 8, 8))
    assert n == int(budget // per_step) and n < 10


def test_budget_below_the_cheapest_genome_is_refused(reg):
    s = space(reg)
    floor = B.min_bitops(s, reg)
    np.testing.assert_allclose(floor, B.budget_bitops(reg, 5, 5, 10), rtol=1e-6)
    with pytest.raises(UserError, match="at least") as e:
        B.check_budget(s, reg, floor * 0.9)
    assert f"{floor:.4g}" in str(e.value)
    B.check_budget(s, reg, floor)


def test_penalty_only_over_budget():
    fid = jnp.array([3.0, 3.0, 3.0])
    out = B.penalized(fid, jnp.array([90.0, 100.0, 110.0]), 100.0, 1000.0)
    np.testing.assert_allclose(out, [3.0, 3.0, 103.0], rtol=1e-5)


@pytest.mark.parametrize("name", ["tmpq_ga", "simple_ga", "cma_es", "random"])
def test_strategies_search_a_toy_problem(reg, name):
    cfg = SearchConfig(strategy=name, population=8, generations=4)
    s = GenomeSpace.build(cfg, reg)
    strat = make_strategy(cfg, s)
    target = jnp.asarray(s.hi - 1)

    def fit(g):  # distance to the all-lowest-bits genome
        return jnp.sum(jnp.abs(g - target), axis=-1).astype(jnp.float32)

    @jax.jit
    def run(key):
        raw, g = strat.first(jax.random.fold_in(key, 0))
        st = strat.start(jax.random.fold_in(key, 1), raw, fit(g))
        gens = [g]
        for i in range(3):
            raw, g, st = strat.ask(jax.random.fold_in(key, 2 + i), st)
            st = strat.tell(jax.random.fold_in(key, 9 + i), raw, fit(g), st)
            gens.append(g)
        return gens

    gens = run(jax.random.key(0))
    assert gens[0].shape == (8, s.num_genes) and gens[1].shape == (
        cfg.offspring,
        s.num_genes,
    )
    np.testing.assert_array_equal(gens[0][0], s.seed)  # generation 0 holds the seed
    for g in gens:
        assert g.dtype == jnp.int32 and ((g >= s.lo) & (g < s.hi)).all()
    assert len({np.asarray(g).tobytes() for g in gens}) == 4  # it moves
    if name == "tmpq_ga":  # elitism: the best so far never gets worse
        best = np.minimum.accumulate([float(fit(g).min()) for g in gens])
        assert best[-1] < float(fit(gens[0]).min())
