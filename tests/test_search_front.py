"""The front from one search (`search.objective=front`, NSGA-II, `search/nsga2.py`):
non-dominated sorting and crowding against brute force, survival, the front's
points within the budget (front.json, `--pick`), an exact resume after a kill, and
the bad inputs. The fitness is a toy (more bits score better), so a real front
exists and the programs compile in seconds."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_search_engine import SEARCH, tiny_parts

from tmpq_jax.diffusion.schedules import quad_timesteps
from tmpq_jax.errors import ArgumentError, UserError
from tmpq_jax.genome_file import read_genome
from tmpq_jax.quant import cost
from tmpq_jax.search import SearchConfig, SearchRunConfig, build_setup, run_generations
from tmpq_jax.search import budget as B
from tmpq_jax.search.front import FRONT_FILE, FRONT_PLOT, write_front
from tmpq_jax.search.nsga2 import (
    NSGA2Strategy,
    crowding_distance,
    nondominated_rank,
    spread_random,
    survivors,
)
from tmpq_jax.search.outputs import archive_table, feasible_mask, pareto_front
from tmpq_jax.search.space import GenomeSpace

FRONT = dict(
    SEARCH,
    objective="front",
    population=8,
    generations=4,
    timestep_mode="variable",
    num_steps=4,
    min_steps=2,
    budget_steps=4,
)


# -- sorting and crowding against brute force ----------------------------------
def brute_ranks(f: np.ndarray) -> np.ndarray:
    """Peel the non-dominated set off, again and again, by definition."""
    rank, r = np.full(len(f), -1), 0
    while (rank < 0).any():
        left = np.flatnonzero(rank < 0)
        for i in left:
            if not any(
                (f[j] <= f[i]).all() and (f[j] < f[i]).any() for j in left if j != i
            ):
                rank[i] = r
        r += 1
    return rank


def brute_crowding(f: np.ndarray, rank: np.ndarray) -> np.ndarray:
    d = np.zeros(len(f))
    for r in np.unique(rank):
        idx = np.flatnonzero(rank == r)
        for k in range(f.shape[1]):
            order = idx[np.lexsort((f[idx, k],))]  # stable, as the jnp version
            span = f[idx, k].max() - f[idx, k].min()
            d[order[0]] = d[order[-1]] = np.inf
            for a, i, b in zip(order, order[1:], order[2:], strict=False):
                d[i] += (f[b, k] - f[a, k]) / span if span > 0 else 0.0
    return d


@pytest.mark.parametrize(("n", "m", "levels"), [(40, 2, 5), (33, 3, 4), (25, 2, 50)])
def test_nondominated_sort_matches_brute_force(n, m, levels):
    """Random points on a coarse grid: many ties, equal points, several fronts."""
    rank_fn = jax.jit(nondominated_rank)
    crowd_fn = jax.jit(crowding_distance)
    for seed in range(5):
        f = np.random.default_rng(seed).integers(0, levels, (n, m)).astype(np.float32)
        rank = np.asarray(rank_fn(jnp.asarray(f)))
        np.testing.assert_array_equal(rank, brute_ranks(f))
        crowd = np.asarray(crowd_fn(jnp.asarray(f), jnp.asarray(rank)))
        np.testing.assert_allclose(crowd, brute_crowding(f, rank), rtol=1e-5)


def test_survival_is_rank_then_crowding_and_drops_copies():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 3, (30, 4)).astype(np.int32)  # many copies of a genome
    f = np.stack([g[:, 0] - g[:, 2], g[:, 1] - g[:, 3]], 1).astype(np.float32)
    f[3] = np.nan  # a failed evaluation: worst in both, never on the front
    keep, rank, crowd = map(np.asarray, survivors(jnp.asarray(g), jnp.asarray(f), 12))
    # expected: the first copy of each genome, by brute-force rank, then crowding
    firsts = np.array(sorted({g[i].tobytes(): i for i in range(29, -1, -1)}.values()))
    assert len(firsts) >= 12
    fv = np.where(np.isfinite(f), f, 1e30)[firsts]
    r, c = brute_ranks(fv), brute_crowding(fv, brute_ranks(fv))
    want = firsts[np.lexsort((-c, r))][:12]
    np.testing.assert_array_equal(keep, want)
    np.testing.assert_array_equal(rank, r[np.lexsort((-c, r))][:12])
    assert 3 not in keep[rank == 0]


def test_generation_zero_spreads_over_the_cost_axis(parts):
    _, reg, _, _ = parts
    cfg = SearchConfig(**FRONT)
    space = GenomeSpace.build(cfg, reg)
    g = spread_random(space, jax.random.key(0), 32)
    assert ((np.asarray(g) >= space.lo) & (np.asarray(g) < space.hi)).all()
    total = np.asarray(jax.vmap(lambda x: B.genome_cost(space, reg, x)[0])(g))
    # genome i leans cheaper with i: the costs fall over the population
    assert np.corrcoef(np.arange(32), total)[0, 1] < -0.8
    assert total.max() > 3 * total.min()
    # with N searched, the even genomes sit on the quad grid of their own N (the
    # seed's kind of steps), the odd ones keep random timesteps
    for i, genome in enumerate(np.asarray(g)):
        d = space.decode(genome)
        on_grid = np.array_equal(np.unique(d.timesteps), quad_timesteps(int(genome[4])))
        assert on_grid or i % 2, (i, genome)
    assert not all(
        np.array_equal(np.unique(space.decode(x).timesteps), quad_timesteps(int(x[4])))
        for x in np.asarray(g)[1::2]
    )
    # the grid table holds the seed: the budget's steps, padded as the seed is
    np.testing.assert_array_equal(space.grids[4], space.seed[:4])


@pytest.mark.parametrize("flow_shift", [None, 3.0])
def test_the_grid_table_holds_the_variable_seed_at_every_budget(parts, flow_shift):
    """Row k: the k-step grid (quad, or the flow model's shifted grid) padded with
    its last step; the seed of a budget of k steps is that row."""
    from tmpq_jax.diffusion.flow import flow_gene_groups

    _, reg, _, _ = parts
    for k in (2, 3, 4):
        cfg = SearchConfig(**{**FRONT, "budget_steps": k})
        space = GenomeSpace.build(cfg, reg, flow_shift=flow_shift)
        grid = (quad_timesteps(k) if flow_shift is None
                else flow_gene_groups(k, flow_shift, 1000)[1] - 1)  # fmt: skip
        want = np.concatenate([grid, np.full(4 - k, grid[-1])])
        np.testing.assert_array_equal(space.grids[k], want)
        np.testing.assert_array_equal(space.seed[:4], want)


# -- the search: toy fitness, real engine and host loop -------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ToyProblem:
    """More bits and more steps score better (a real trade-off with BitOPs)."""

    space: object
    registry: object

    def population_fid(self, assets, genomes, axis=None):
        s = self.space
        bits = genomes[:, s.w_slice].sum(-1) + genomes[:, s.a_slice].sum(-1)
        steps = s.num_steps - genomes[:, s.num_steps]  # fewer steps: worse
        return (1.0 + bits + 2 * steps).astype(jnp.float32)


@pytest.fixture(scope="module")
def parts(tiny_cfg, tiny_params):
    return tiny_parts(tiny_cfg, tiny_params)


def toy_setup(parts, **kw):
    lm, reg, net, stats = parts
    run = SearchRunConfig(search=SearchConfig(**{**FRONT, **kw}))
    setup = build_setup(run, lm, reg, None, None, net, stats)
    problem = ToyProblem(setup.space, setup.registry)
    return dataclasses.replace(
        setup, engine=dataclasses.replace(setup.engine, problem=problem)
    )


@pytest.fixture(scope="module")
def setup(parts):
    return toy_setup(parts)


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    wd = tmp_path_factory.mktemp("front")
    return wd, run_generations(setup, wd, progress=False)


def test_objective_front_runs_nsga2_told_both_objectives(setup, full_run):
    _, state = full_run
    assert setup.run.search.strategy == "nsga2"
    assert isinstance(setup.engine.strategy, NSGA2Strategy)
    a = jax.device_get(state.archive)
    np.testing.assert_array_equal(a.count, [8, 6, 6, 6])
    s = state.strategy  # the kept population: the best of everything scored
    assert s.population.shape == (8, setup.space.num_genes)
    np.testing.assert_allclose(
        s.objectives[:, 1],
        jax.vmap(lambda g: B.genome_cost(setup.space, setup.registry, g)[0])(
            s.population
        ),
        rtol=1e-6,
    )
    assert len({np.asarray(g).tobytes() for g in s.population}) == 8
    assert (s.rank == 0).sum() >= 3  # a front, not a point


def test_front_search_resumes_exactly_after_a_kill(setup, full_run, tmp_path):
    _, full = full_run
    run_generations(setup, tmp_path, progress=False, stop_after=2)  # "killed"
    resumed = run_generations(setup, tmp_path, progress=False)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert setup.engine.programs[1]._cache_size() == 1  # resume did not recompile


@pytest.fixture(scope="module")
def front_file(setup, full_run):
    wd, state = full_run
    t = archive_table(setup, state)
    mask = feasible_mask(t, setup.budget)
    summary = write_front(
        setup, t, mask, pareto_front(t["bitops"][mask], t["fid"][mask]), wd
    )
    return wd / FRONT_FILE, summary, t


def test_every_front_point_fits_its_budget(setup, front_file):
    path, summary, t = front_file
    assert (path.parent / FRONT_PLOT).stat().st_size > 1000
    d = json.loads(path.read_text())
    pts = d["front"]
    assert summary["points"] == len(pts) >= 3
    costs = [p["total_bitops"] for p in pts]
    assert costs == sorted(costs) and costs == summary["total_bitops"]
    assert all(cost.within_budget(c, setup.budget) for c in costs)
    assert all(cost.within_budget(c, setup.budget) for c in t["bitops"])  # repaired
    fids = [p["fid_search"] for p in pts]
    assert all(a > b for a, b in zip(fids, fids[1:], strict=False))  # non-dominated
    for p in pts:  # ... among everything the search scored
        assert not (
            (t["bitops"] <= p["total_bitops"]) & (t["fid"] < p["fid_search"])
        ).any()
    assert d["model_fingerprint"] and all(p["model_fingerprint"] for p in pts)
    assert d["fitness"] == min(p["fitness"] for p in pts)  # the top level: the best


def test_pick_serves_the_point_at_or_below_a_budget(setup, front_file):
    path, _, _ = front_file
    pts = json.loads(path.read_text())["front"]
    top = read_genome(path, setup.registry)  # the file itself: its best point
    assert top.meta["fitness"] == min(p["fitness"] for p in pts)
    for k, p in enumerate(pts):
        for want in (p["total_bitops"], p["total_bitops"] * 1.0000001):
            g = read_genome(path, setup.registry, pick=want)
            assert g.meta["total_bitops"] == p["total_bitops"]
            assert g.timesteps.tolist() == p["timesteps"]
        if k + 1 < len(pts):  # just below the next point: still this one
            below = pts[k + 1]["total_bitops"] * 0.999
            if below > p["total_bitops"]:
                g = read_genome(path, setup.registry, pick=below)
                assert g.meta["total_bitops"] == p["total_bitops"]
    low = pts[0]["total_bitops"]
    with pytest.raises(ArgumentError, match="below the cheapest point") as e:
        read_genome(path, setup.registry, pick=low * 0.5)
    assert f"use at least {low:.4g}" in str(e.value) and "\n" not in str(e.value)


def test_a_front_search_writes_its_front_with_its_outputs(
    setup, full_run, tmp_path, monkeypatch
):
    """write_outputs (what `tmpq search` ends with) adds front.json and front.png;
    the top-k re-scoring is stubbed (the toy problem samples no images)."""
    from tmpq_jax.search import outputs

    def rescored(setup, genome, progress, ev=None, seconds=None):
        return {"fid": 1.0, "num_samples": 4}, np.zeros((4, 16, 16, 1)), 1.0

    monkeypatch.setattr(outputs, "rescore_and_select", rescored)
    result = outputs.write_outputs(setup, full_run[1], tmp_path, progress=False)
    assert result["front"]["file"] == FRONT_FILE and result["front"]["points"] >= 3
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["front"] == result["front"]
    assert (tmp_path / FRONT_FILE).is_file() and (tmp_path / FRONT_PLOT).is_file()


# -- bad inputs -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(space="timesteps", timestep_mode="grouped"), "has one objective"),
        (dict(space="timesteps", timestep_mode="free"), "costs the same BitOPs"),
        (dict(objective="pareto"), "search.objective='pareto': use one of"),
        (dict(strategy="cma_es"), "is searched by one of \\['nsga2'"),
        (dict(objective="single", strategy="nsga2"), "strategy='nsga2' with obj"),
        (dict(min_steps=5), "search.min_steps=5: use 1..num_steps \\(4\\)"),
    ],
)
def test_bad_front_configs_are_one_line(kw, msg):
    with pytest.raises(UserError, match=msg) as e:
        SearchConfig(**{**FRONT, **kw})
    assert "\n" not in str(e.value)


def test_front_of_timesteps_with_variable_steps_is_two_objectives():
    cfg = SearchConfig(**{**FRONT, "space": "timesteps"})
    assert cfg.strategy == "nsga2"


def test_budget_below_the_cheapest_genome_at_the_minimum_n(parts):
    """The floor is the cheapest bits at min_steps (not at num_steps)."""
    _, reg, _, _ = parts
    per_step = B.min_bitops(
        GenomeSpace.build(SearchConfig(**{**FRONT, "min_steps": 1}), reg), reg
    )
    for min_steps in (2, 3):
        space = GenomeSpace.build(
            SearchConfig(**{**FRONT, "min_steps": min_steps}), reg
        )
        floor = B.min_bitops(space, reg)
        np.testing.assert_allclose(floor, min_steps * per_step, rtol=1e-6)
        B.check_budget(space, reg, floor)
        with pytest.raises(UserError, match=re.escape(f"at least {floor:.4g}")) as e:
            B.check_budget(space, reg, floor * 0.99)
        assert "\n" not in str(e.value)
