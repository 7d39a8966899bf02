"""The search on a tiny UNet: one compile for every generation, resume == an
uninterrupted run, NaN candidates scored worst, other searches' workdirs refused,
and the result files. One compiled engine serves the whole module."""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.diffusion.schedules import DiffusionConfig
from tmpq_jax.errors import UserError
from tmpq_jax.evaluation import FITNESS_NAMES
from tmpq_jax.genome_file import read_genome
from tmpq_jax.metrics.classifier import Classifier, ClassifierConfig
from tmpq_jax.metrics.feature_net import FeatureNet
from tmpq_jax.metrics.reference import sqrtm_psd64
from tmpq_jax.quant import cost, unet_registry
from tmpq_jax.quant.supernet import QParams
from tmpq_jax.sampling import LoadedModel
from tmpq_jax.search import SearchConfig, SearchRunConfig, build_setup, run_generations
from tmpq_jax.search.fitness import WORST_FID
from tmpq_jax.search.outputs import write_outputs
from tmpq_jax.search.run import read_log

SEARCH = dict(
    fitness="fid",  # these tests pin FID's behaviour; the teacher's: test_fitness_choices
    population=4,
    generations=3,
    num_samples=16,
    rescore_samples=24,
    rescore_batch=24,
    rescore_top_k=2,
    candidate_chunk=2,
)


def tiny_parts(tiny_cfg, tiny_params):
    """(model, registry, feature net, reference stats) of a tiny search (also
    used by the multi-device runs of tests/sharded_search.py)."""
    lm = LoadedModel(tiny_cfg, DiffusionConfig(), tiny_params, {"model": "tiny"})
    ccfg = ClassifierConfig(widths=(8, 16), feature_dim=8, num_groups=4)
    shape = (tiny_cfg.image_size, tiny_cfg.image_size, 1)
    p = Classifier(ccfg).init(jax.random.key(2), jnp.zeros((1, *shape)))["params"]
    net = FeatureNet(p, ccfg, "tiny-net", shape)
    real = jax.random.uniform(jax.random.key(3), (64, *shape), minval=-1, maxval=1)
    f = np.asarray(net.features(real), np.float64)
    sig = np.cov(f, rowvar=False)
    stats = dict(
        mu_test=f.mean(0),
        sigma_test=sig,
        sqrt_sigma_test=sqrtm_psd64(sig),
        features_test=f.astype(np.float32),
    )
    # The fitness reads the train split's statistics (here the same images).
    stats.update({k.replace("_test", "_train"): v for k, v in stats.items()})
    return lm, unet_registry(tiny_cfg), net, stats


@pytest.fixture(scope="module")
def parts(tiny_cfg, tiny_params):
    return tiny_parts(tiny_cfg, tiny_params)


def make_setup(parts, **kw):
    lm, reg, net, stats = parts
    run = SearchRunConfig(search=SearchConfig(**{**SEARCH, **kw}))
    return build_setup(run, lm, reg, None, None, net, stats)


@pytest.fixture(scope="module")
def setup(parts):
    return make_setup(parts)


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    return wd, run_generations(setup, wd, progress=False)


def test_generations_compile_once_and_fill_the_archive(setup, full_run):
    _, state = full_run
    first, nxt = setup.engine.programs
    assert first._cache_size() == 1 and nxt._cache_size() == 1
    a = state.archive
    np.testing.assert_array_equal(a.count, [4, 3, 3])  # top-1 elite kept, 3 new
    assert int(state.generation) == 3
    assert np.isfinite(np.asarray(a.fid)[0]).all() and (np.asarray(a.fid) > 0).all()
    # every scored genome fits the budget (repair), and the BitOPs are its own
    g = np.asarray(a.genomes)[0]
    d = jax.vmap(setup.space.decode)(jnp.asarray(g))
    total = cost.bitops_per_step(d.bits, setup.registry) * d.num_steps
    np.testing.assert_allclose(np.asarray(a.bitops)[0], total, rtol=1e-6)
    assert np.asarray(cost.within_budget(a.bitops[0], setup.budget)).all()


def test_resume_equals_uninterrupted(setup, full_run, tmp_path):
    _, full = full_run
    run_generations(setup, tmp_path, progress=False, stop_after=1)  # "killed"
    resumed = run_generations(setup, tmp_path, progress=False)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    log = read_log(tmp_path)
    assert [r["generation"] for r in log] == [0, 1, 2]
    assert read_log(tmp_path / "nowhere") == []
    assert setup.engine.programs[1]._cache_size() == 1  # resume did not recompile


def test_same_seed_same_search_other_seed_differs(parts, setup, full_run, tmp_path):
    _, full = full_run
    first = setup.engine.programs[0]
    state = first(setup.assets, np.int32(1))  # the seed is traced: same program
    assert not np.array_equal(state.archive.genomes[0], full.archive.genomes[0])
    again = first(setup.assets, np.int32(0))
    np.testing.assert_array_equal(again.archive.fid[0], full.archive.fid[0])
    assert first._cache_size() == 1
    # a setup built for seed 1 draws what the shared program drew for seed 1
    other = make_setup(parts, seed=1)
    mine = jax.jit(other.engine.first_generation)(other.assets, np.int32(1))
    np.testing.assert_array_equal(mine.archive.genomes, state.archive.genomes)


def test_sample_chunks_that_do_not_divide_give_the_same_images(setup):
    problem = setup.engine.problem
    cands = problem.candidates
    # static activation ranges: dynamic ones are taken over the batch sampled together
    qparams = QParams(
        cands, jnp.full((len(problem.registry), 2, len(cands)), 3.0), None
    )
    assets = setup.assets.replace(qparams=qparams)
    genome = jnp.asarray(setup.space.seed)
    x_T = assets.noise  # 16 images: chunks of 6, 6 and a padded 4
    whole = jax.jit(problem.sample)(assets, genome, x_T)
    chunked = dataclasses.replace(problem, sample_chunk=6)
    parts = jax.jit(chunked.sample)(assets, genome, x_T)
    assert parts.shape == whole.shape
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)


def test_nan_samples_get_the_worst_fitness(setup):
    bad = setup.assets.replace(
        params=jax.tree.map(lambda p: p * jnp.nan, setup.assets.params)
    )
    state = setup.engine.programs[0](bad, np.int32(0))  # assets are arguments
    np.testing.assert_array_equal(state.archive.fid[0], WORST_FID)


def test_workdir_of_another_search_is_refused(parts, full_run):
    wd, _ = full_run
    other = make_setup(parts, mutation_prob=0.5)
    with pytest.raises(UserError, match="mutation_prob"):
        run_generations(other, wd, progress=False)


def test_outputs(setup, full_run):
    wd, state = full_run
    result = write_outputs(setup, state, wd, progress=False)
    for name in ("archive.npz", "pareto.json", "topk.json", "result.json"):
        assert (wd / name).is_file()
    for name in ("fid_vs_bitops", "bit_allocation", "timesteps", "best_samples"):
        assert (wd / f"{name}.png").stat().st_size > 1000
    g = read_genome(wd / "result.json", setup.registry)
    assert len(g.timesteps) == 10 and result["evaluations"] == 10
    assert result["total_bitops"] <= setup.budget * (1 + 1e-6)
    top = json.loads((wd / "topk.json").read_text())["genomes"]
    fids = [t["rescored"]["fid"] for t in top]
    assert fids == sorted(fids) and result["rescored"]["fid"] == fids[0]
    assert result["rescored"]["num_samples"] == 24
    # the files name what their fitness values are: FID here (fitness fid)
    assert result["metric"] == FITNESS_NAMES["fid"]
    assert json.loads((wd / "pareto.json").read_text())["metric"] == FITNESS_NAMES["fid"]
    pts = json.loads((wd / "pareto.json").read_text())["points"]
    for p in pts:  # nothing on the front is dominated by another front point
        assert not any(
            q["total_bitops"] <= p["total_bitops"] and q["fid"] < p["fid"] for q in pts
        )
    with np.load(wd / "archive.npz") as z:
        assert z["genomes"].shape == (10, setup.space.num_genes)


def test_a_finished_search_is_not_rerun(parts, setup, full_run, monkeypatch):
    """Rerunning a finished search returns its result.json untouched; rescore=True
    (`tmpq search --rescore`) re-scores and rewrites it."""
    from tmpq_jax.search import run as run_lib

    wd, state = full_run
    if not (wd / "result.json").exists():  # test_outputs wrote them, if it ran
        write_outputs(setup, state, wd, progress=False)
    written = json.loads((wd / "result.json").read_text())
    assert run_lib.finished_result(setup, wd) == written
    # outputs of another config (a re-scoring key), or another search: not finished
    assert run_lib.finished_result(make_setup(parts, rescore_samples=32), wd) is None
    assert run_lib.finished_result(make_setup(parts, mutation_prob=0.5), wd) is None
    assert run_lib.finished_result(setup, wd / "elsewhere") is None
    monkeypatch.setattr(run_lib, "prepare", lambda run, workdir, progress: setup)
    before = (wd / "result.json").stat().st_mtime_ns
    assert run_lib.search(setup.run, wd, progress=False) == {**written, "reused": True}
    assert (wd / "result.json").stat().st_mtime_ns == before
    t0 = time.perf_counter()
    again = run_lib.search(setup.run, wd, progress=False, rescore=True)
    wall = time.perf_counter() - t0
    assert "reused" not in again and again["rescored"] == written["rescored"]
    assert (wd / "result.json").stat().st_mtime_ns != before
    # where the time went: the three phases add up to the call, the outputs' parts
    # to at most the outputs; none of it is written to result.json
    s = again.pop("seconds")
    assert "seconds" not in json.loads((wd / "result.json").read_text())
    assert sum(s[k] for k in ("prepare", "generations", "outputs")) <= wall + 1e-3
    parts = ("rescore_sampling", "report", "select", "plots")
    assert all(s[k] > 0 for k in parts)
    assert sum(s[k] for k in parts) <= s["outputs"] + 1e-3


def test_a_chunk_size_cudnn_rejects_is_a_user_error():
    """On an H100 cuDNN rejects the grouped convs of some vmapped chunk sizes
    (CUDNN_STATUS_BAD_PARAM at 5): the search says which setting and what to use;
    any other device error, or one at chunk 1, passes through unchanged."""
    import types

    from tmpq_jax.search.run import _explained_device_errors

    bad = jax.errors.JaxRuntimeError("INTERNAL: ... CUDNN_STATUS_BAD_PARAM ...")
    with pytest.raises(UserError, match=r"candidate_chunk=5: .* use 1"):
        with _explained_device_errors(types.SimpleNamespace(candidate_chunk=5)):
            raise bad
    for chunk, err in ((1, bad), (5, jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED"))):
        with pytest.raises(jax.errors.JaxRuntimeError):
            with _explained_device_errors(types.SimpleNamespace(candidate_chunk=chunk)):
                raise err
