"""Racing (search/racing.py) on the tiny search of test_search_engine: off, the
fitness is today's bit for bit; on, the kept candidates have their full-batch
scores and every dropped one ranks below every kept one; bad schedules are
refused in one line; a raced search resumes exactly and counts its work."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_search_engine import make_setup, tiny_parts

from tmpq_jax.cli import main
from tmpq_jax.errors import UserError
from tmpq_jax.search import SearchConfig, racing, run_generations
from tmpq_jax.search.fitness import Assets
from tmpq_jax.search.outputs import write_outputs
from tmpq_jax.search.run import read_log

# population 4 (1 elite, 3 offspring), 16 samples, the feature net's 8 dims:
# 10 prefix samples; 1 kept a generation (the elite count), and the seed genome
# in generation 0: 2 of 4, then 1 of 3.
RACE = dict(race_samples=10, race_keep=0.25)


@pytest.fixture(scope="module")
def parts(tiny_cfg, tiny_params):
    return tiny_parts(tiny_cfg, tiny_params)


@pytest.fixture(scope="module")
def raced(parts):
    return make_setup(parts, **RACE)


@pytest.fixture(scope="module")
def off(parts):
    """The search without racing, and its evaluation of a first population."""
    setup = make_setup(parts)
    genomes = setup.engine.strategy.first(jax.random.key(3))[1]
    return setup, jax.jit(setup.engine.evaluate)(setup.assets, genomes)


def test_racing_off_is_todays_fitness_bit_for_bit(off):
    setup, (g, fid, fitness, _, samples) = off
    want = jax.jit(setup.engine.problem.population_fid)(setup.assets, g)
    np.testing.assert_array_equal(fid, want)
    np.testing.assert_array_equal(fitness, fid)  # repaired: no penalty
    np.testing.assert_array_equal(samples, 16)


def test_kept_scores_are_full_scores_and_dropped_rank_below(raced, off):
    _, (genomes, full, *_) = off
    engine, assets = raced.engine, raced.assets
    evaluate = jax.jit(engine.evaluate, static_argnums=2)
    g, fid, fitness, _, samples = evaluate(assets, genomes, (0,))
    np.testing.assert_array_equal(g, genomes)  # already repaired
    pre = jax.jit(engine.problem.population_fid)(racing.prefix(assets, 10), g)
    fid, fitness, pre = (np.asarray(x) for x in (fid, fitness, pre))
    kept = np.asarray(samples) == 16
    assert kept.sum() == 2 and set(np.asarray(samples)) == {10, 16}
    np.testing.assert_allclose(fid[kept], np.asarray(full)[kept], rtol=1e-6)
    np.testing.assert_allclose(fid[~kept], pre[~kept], rtol=1e-6)
    assert fitness[kept].max() < fitness[~kept].min()
    # kept: the seed genome (forced) and the best prefix score of the others
    assert kept[0] and kept[1 + np.argmin(pre[1:])]
    # the dropped keep their prefix order
    assert (~kept).sum() == 2
    order = np.argsort(fitness[~kept])
    np.testing.assert_array_equal(order, np.argsort(pre[~kept]))


def test_race_rule_on_a_toy_fitness():
    """A fitness with a small-sample bias (100 / samples), so prefix and full
    scores are not comparable: the dropped still rank below every kept one (the
    forced one included), in their prefix order."""
    assets = Assets(*([None] * 7), noise=jnp.zeros((20, 1)))
    score = lambda a, g: g[:, 0].astype(jnp.float32) + 100.0 / a.noise.shape[0]  # noqa: E731
    genomes = jnp.array([[7], [1], [3], [3], [9], [0]], jnp.int32)
    bitops = jnp.zeros(6)
    fid, fit, samples = racing.race(
        score, lambda f, b: f, assets, genomes, bitops, 4, 2, 20, forced=(4,)
    )
    np.testing.assert_array_equal(samples, [4, 20, 4, 4, 20, 20])  # 9 forced
    np.testing.assert_allclose(fid, [32, 6, 28, 28, 14, 5])  # prefix: +25, full: +5
    worst = 14.0  # the worst full fitness; the dropped: 14 + gap to the best dropped
    up = np.nextafter(np.float32(worst), np.float32(np.inf))
    np.testing.assert_array_equal(fit, np.float32([worst + 4, 6, up, up, 14, 5]))
    fit = np.asarray(fit)
    assert fit[[0, 2, 3]].min() > fit[[1, 4, 5]].max()
    assert racing.num_kept(6, 0.25, 1) == 2 and racing.num_kept(6, 0.1, 3) == 3
    assert racing.num_kept(3, 0.5, 1) == 2 and racing.num_kept(40, 0.25, 10) == 10
    # the CPU default raced on 64 samples: 2 elites (and the seed) of 8, 2 of 6
    cfg = SearchConfig(population=8, generations=3, num_samples=256, race_samples=64)
    assert cfg.samples_scored == (3 * 256 + 5 * 64) + 2 * (2 * 256 + 4 * 64)


@pytest.mark.parametrize(
    "kw, expect",
    [
        (dict(race_samples=8, race_keep=0.0), "keeps no candidate"),
        (dict(race_samples=8, race_keep=-0.5), "keeps no candidate"),
        (dict(race_samples=8, race_keep=1.0), "drops none"),
        (dict(race_samples=16), "fewer than num_samples=16"),
        (dict(race_samples=-1), "race_samples=-1: must be >= 0"),
        (dict(race_samples=8, objective="front"), "a race ranks one fitness"),
    ],
)
def test_bad_schedules_are_one_line(kw, expect):
    with pytest.raises(UserError, match=expect) as e:
        SearchConfig(**{"num_samples": 16, **kw})
    assert "\n" not in str(e.value)


def test_bad_schedules_from_the_cli_and_a_prefix_too_small_for_fid(
    parts, tmp_path, capsys
):
    wd = tmp_path / "wd"
    args = ["search", "--config", "configs/fmnist_search_cpu.py", "--workdir", str(wd)]
    assert (
        main([*args, "--config.search.race_samples=64", "--config.search.race_keep=0"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "race_keep=0.0: a halving schedule that keeps no candidate" in err
    assert "\n" not in err and not wd.exists()
    with pytest.raises(UserError, match="race_samples=8: FID needs more") as e:
        make_setup(parts, race_samples=8)
    assert "\n" not in str(e.value)


def test_a_raced_search_resumes_exactly_and_counts_its_work(raced, tmp_path):
    full = run_generations(raced, tmp_path / "full", progress=False)
    run_generations(raced, tmp_path / "cut", progress=False, stop_after=1)  # "killed"
    resumed = run_generations(raced, tmp_path / "cut", progress=False)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert raced.engine.programs[1]._cache_size() == 1  # resume did not recompile
    a = full.archive
    samples, fit = np.asarray(a.samples), np.asarray(a.fitness)
    for gen, n in enumerate(np.asarray(a.count)):  # dropped below kept, each row
        kept = samples[gen, :n] == 16
        assert kept.sum() == 2 - min(gen, 1)
        assert fit[gen, :n][kept].max() < fit[gen, :n][~kept].min()
    per_gen = np.asarray(a.samples).sum(1)  # 2 x 16 + 2 x 10; then 16 + 2 x 10
    np.testing.assert_array_equal(per_gen, [52, 36, 36])
    # The log counts sample-forwards (10 DDIM steps a sample), as resumed too.
    for wd in ("full", "cut"):
        log = read_log(tmp_path / wd)
        assert [r["sample_forwards"] for r in log] == [520, 360, 360]
        assert [r["sample_forwards_total"] for r in log] == [520, 880, 1240]
        assert [r["raced_out"] for r in log] == [2, 2, 2]
    # The results are made of fully scored genomes, and say what the work was.
    result = write_outputs(raced, full, tmp_path / "full", progress=False)
    assert result["sample_forwards"] == 1240 and result["raced_out"] == 6
    assert result["samples_scored"] == 124 and result["evaluations"] == 10
    assert raced.cfg.samples_scored == 124  # what `tmpq search` announces
    assert result["seed_genome"]["fid_search"] == float(a.fid[0, 0])
    assert int(a.samples[0, 0]) == 16  # the seed genome: always in full
    with np.load(tmp_path / "full" / "archive.npz") as z:
        full_fids = set(z["fid"][z["samples"] == 16].tolist())
    top = json.loads((tmp_path / "full" / "topk.json").read_text())["genomes"]
    assert {t["fid_search"] for t in top} <= full_fids
    pts = json.loads((tmp_path / "full" / "pareto.json").read_text())["points"]
    assert {p["fid"] for p in pts} <= full_fids


def test_a_sharded_race_splits_its_prefix_too():
    """Under the (POP, SAMPLE) mesh both stages of a race run sharded (checked on
    4 forced CPU devices: the same archive as on one device); the prefix must
    split over SAMPLE as the whole batch does, else the layout keeps it whole."""
    from tmpq_jax.search import sharding as sh

    assert sh.choose_layout(8, 3, 16, 0, 0, True, race_samples=8) == (2, 4)
    assert sh.choose_layout(8, 3, 16, 0, 0, True, race_samples=10) == (8, 1)
    with pytest.raises(UserError, match="race_samples=10 does not split over 4"):
        sh.choose_layout(8, 3, 16, 0, 2, True, race_samples=10)
