"""The search's fitness choices and the split between what a search optimizes
(train split, teacher) and what it reports (test split, evaluation nets), on a
tiny UNet with untrained tiny feature nets; and the grouped search config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.cli import main
from tmpq_jax.config import load_config
from tmpq_jax.diffusion.schedules import DiffusionConfig
from tmpq_jax.errors import UserError
from tmpq_jax.genome_file import genome_from_dict, genome_to_dict
from tmpq_jax.metrics import fid
from tmpq_jax.metrics.classifier import Classifier, ClassifierConfig
from tmpq_jax.metrics.feature_net import FeatureNet
from tmpq_jax.metrics.reference import sqrtm_psd64
from tmpq_jax.quant import unet_registry
from tmpq_jax.quant.supernet import QuantBits
from tmpq_jax.sampling import LoadedModel
from tmpq_jax.search import SearchConfig, SearchRunConfig, build_setup
from tmpq_jax.search import budget as budget_lib
from tmpq_jax.search.config import EvolutionConfig, default_configdict
from tmpq_jax.search.fitness import teacher_samples
from tmpq_jax.search.outputs import rescore_and_select

CPU = "configs/fmnist_search_cpu.py"
TINY = dict(population=4, generations=2, num_samples=16, rescore_samples=24, fitness="fid")
TINY.update(rescore_batch=24, rescore_top_k=1, num_steps=2, budget_steps=2)


def _net(seed, shape, width=8, arch="cnn"):
    cfg = ClassifierConfig(widths=(width, 16), feature_dim=8, num_groups=4, arch=arch)
    p = Classifier(cfg).init(jax.random.key(seed), jnp.zeros((1, *shape)))["params"]
    return FeatureNet(p, cfg, f"tiny-{arch}-{seed}", shape)


def _stats(net, shape):
    """Train and test statistics from two different random image sets."""
    out = {}
    for split, seed in (("train", 3), ("test", 4)):
        real = jax.random.uniform(jax.random.key(seed), (64, *shape), minval=-1)
        f = np.asarray(net.features(real), np.float64)
        sig = np.cov(f, rowvar=False)
        out.update(
            {
                f"mu_{split}": f.mean(0),
                f"sigma_{split}": sig,
                f"sqrt_sigma_{split}": sqrtm_psd64(sig),
            }
        )
        if split == "test":
            out["features_test"] = f.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def parts(tiny_cfg, tiny_params):
    lm = LoadedModel(tiny_cfg, DiffusionConfig(), tiny_params, {"model": "tiny"})
    shape = (tiny_cfg.image_size, tiny_cfg.image_size, 1)
    nets = [_net(2, shape), _net(5, shape, 16), _net(6, shape, arch="resnet")]
    return lm, unet_registry(tiny_cfg), shape, [(n, _stats(n, shape)) for n in nets]


def _setup(parts, stats=None, ensemble=(), evals=(), **kw):
    lm, reg, _, nets = parts
    run = SearchRunConfig(search=SearchConfig(**{**TINY, **kw}))
    net, st = nets[0]
    return build_setup(
        run, lm, reg, None, None, net, st if stats is None else stats,
        ensemble=ensemble, eval_nets=evals,
    )  # fmt: skip


def _images(shape, n=16, seed=9):
    return jax.random.uniform(jax.random.key(seed), (n, *shape), minval=-1)


def test_fitness_reads_train_statistics_never_test(parts, monkeypatch):
    _, _, shape, nets = parts
    net, st = nets[0]
    poisoned = {k: (v * np.nan if "test" in k else v) for k, v in st.items()}
    setup = _setup(parts, stats=poisoned)
    a = setup.assets
    np.testing.assert_allclose(np.asarray(a.mu_ref), st["mu_train"], rtol=1e-6)
    x = _images(shape)
    got = float(setup.engine.problem.score_images(a, x))
    want = fid(np.asarray(net.features(x)), st["mu_train"], st["sigma_train"])
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-3)
    # The selection of the final top-k reads the train split too.
    assert setup.select_score(np.asarray(x)) == pytest.approx(want, rel=1e-3)
    # The search's outputs rank their top-k the same way: with test statistics
    # poisoned, the selection score stays finite (only the report reads them).
    nan_report = lambda self, images, key=None: {"fid": float("nan")}  # test split
    monkeypatch.setattr(type(setup), "report", nan_report)
    report, imgs, select = rescore_and_select(
        setup, np.asarray(setup.space.seed), False
    )
    assert np.isfinite(select) and not np.isfinite(report["fid"])
    # Without train statistics there is nothing to optimize: refused, one line.
    only_test = {k: v for k, v in st.items() if "train" not in k}
    with pytest.raises(UserError, match="train split") as e:
        _setup(parts, stats=only_test)
    assert "\n" not in str(e.value)


def test_report_reads_test_statistics_only(parts):
    _, _, shape, nets = parts
    setup = _setup(parts, evals=[nets[2]])
    x = np.asarray(_images(shape, 24))
    r = setup.report(x)
    net, st = nets[0]
    assert r["fid"] == pytest.approx(
        fid(net.extract(x).features, st["mu_test"], st["sigma_test"]), rel=1e-4
    )
    e_net, e_st = nets[2]
    assert r["fid_eval_tiny-resnet-6"] == pytest.approx(
        fid(e_net.extract(x).features, e_st["mu_test"], e_st["sigma_test"]), rel=1e-4
    )
    assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
    # Train statistics of NaN change no reported figure.
    nan_train = {k: (v * np.nan if "train" in k else v) for k, v in st.items()}
    ev = setup.evaluator.from_parts(net, nan_train, [nets[2]])
    assert ev.score(x)["fid"] == pytest.approx(r["fid"], rel=1e-6)


def test_evaluation_nets_never_reach_a_fitness(parts):
    _, _, _, nets = parts
    setup = _setup(parts, fitness="ensemble", ensemble=[nets[1]], evals=[nets[2]])
    fitness_fps = {
        n.fingerprint()
        for n in jax.tree.leaves(
            setup.assets, is_leaf=lambda x: isinstance(x, FeatureNet)
        )
        if isinstance(n, FeatureNet)
    }
    assert fitness_fps == {nets[0][0].fingerprint(), nets[1][0].fingerprint()}
    assert nets[2][0].fingerprint() not in fitness_fps
    # An evaluation net that is a fitness net is refused, in one line.
    for dup in (nets[0], nets[1]):
        with pytest.raises(UserError, match="is the fitness net") as e:
            _setup(parts, fitness="ensemble", ensemble=[nets[1]], evals=[dup])
        assert "\n" not in str(e.value)


def test_ensemble_averages_rescaled_fids(parts):
    _, _, shape, nets = parts
    setup = _setup(parts, fitness="ensemble", ensemble=[nets[1]])
    x = _images(shape)
    values, traces = [], []
    for net, st in nets[:2]:
        values.append(
            fid(np.asarray(net.features(x)), st["mu_train"], st["sigma_train"])
        )
        traces.append(np.trace(st["sigma_train"]))
    want = np.mean([values[0], values[1] * traces[0] / traces[1]])
    got = float(setup.engine.problem.score_images(setup.assets, x))
    assert got == pytest.approx(want, rel=1e-3)


def test_teacher_is_zero_for_itself_and_grows_as_bits_drop(parts):
    setup = _setup(
        parts, fitness="teacher", teacher_steps=2, candidates=(8, 6, 4),
        seed_w_bits=8, seed_a_bits=8, budget_w_bits=8, budget_a_bits=8,
    )  # fmt: skip
    problem, a = setup.engine.problem, setup.assets
    assert float(problem.score_images(a, a.teacher)) == 0.0
    space = setup.space
    fit = jax.jit(problem.fid)
    scores = []
    for b in (8, 6, 4):
        g = np.array(space.seed)
        i = space.candidates.index(b)
        g[space.w_slice] = i
        g[space.a_slice] = np.where(space.hi[space.a_slice] > i, i, 0)
        scores.append(float(fit(a, jnp.asarray(g))))
    assert 0.0 < scores[0] < scores[1] < scores[2], scores


def test_teacher_selection_runs_the_teacher_once_per_noise(parts, monkeypatch):
    """Every top-k genome is re-scored on the same fresh noise: its teacher run is
    made once and reused, with the score of a fresh setup; other noise, another run."""
    import tmpq_jax.search.setup as setup_mod

    kw = dict(fitness="teacher", teacher_steps=2, select="teacher")
    setup, fresh = _setup(parts, **kw), _setup(parts, **kw)
    calls = []
    real = setup_mod.teacher_samples

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(setup_mod, "teacher_samples", counted)
    shape = parts[2]
    x_T, other = np.asarray(_images(shape, 8, 1)), np.asarray(_images(shape, 8, 2))
    a, b = (np.asarray(_images(shape, 8, s)) for s in (3, 4))
    first = setup.select_score(a, x_T)
    assert setup.select_score(b, x_T) == pytest.approx(fresh.select_score(b, x_T))
    assert len(calls) == 2  # setup's one run (reused for b), fresh's one
    assert setup.select_score(a, x_T) == first
    setup.select_score(a, other)
    assert len(calls) == 3


def test_bad_fitness_inputs_are_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="fewer than the candidates' 10 steps") as e:
        SearchConfig(fitness="teacher", teacher_steps=4)
    assert "\n" not in str(e.value)
    wd = tmp_path / "wd"
    for override, expect in (
        ("--config.search.fitness=clipscore", "search.fitness='clipscore'"),
        ("--config.search.teacher_steps=3", "teacher_steps=3 is fewer"),
    ):
        args = ["search", "--config", CPU, "--workdir", str(wd), override]
        if "teacher_steps" in override:
            args.append("--config.search.fitness=teacher")
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and "\n" not in err
    assert not wd.exists()


def test_every_fitness_names_its_values_and_only_fid_calls_them_fid():
    from tmpq_jax.evaluation import FITNESS_NAMES
    from tmpq_jax.search.config import FITNESSES

    assert set(FITNESS_NAMES) == set(FITNESSES)
    others = [FITNESS_NAMES[f] for f in FITNESSES if f != "fid"]
    assert all(not n.startswith("FID") for n in others)  # a teacher distance is no FID
    assert len(set(FITNESS_NAMES.values())) == len(FITNESSES)


def test_config_groups_one_source_of_defaults():
    # The paper protocol file restates nothing: it is the dataclass defaults.
    paper = SearchRunConfig.from_configdict(load_config("configs/fmnist_search.py"))
    assert paper == SearchRunConfig()
    # Flat and grouped spellings build the same config; reads work both ways.
    a = SearchConfig(population=8, conv_dtype="bfloat16")
    b = SearchConfig(
        evolution=EvolutionConfig(population=8), compute={"conv_dtype": "bfloat16"}
    )
    assert a == b and a.population == a.evolution.population == 8
    assert SearchConfig.from_dict(a.to_dict()) == a
    assert a.to_dict()["conv_dtype"] == "bfloat16"  # flat: resume signatures
    # Every setting, conv_dtype and the calibration ones included, is overridable.
    run = SearchRunConfig.from_configdict(
        load_config(
            CPU,
            ["search.conv_dtype=bfloat16", "calib_reconstruct_steps=50",
             "search.fitness=teacher", "eval_nets=('a','b')"],
        )
    )  # fmt: skip
    assert run.search.conv_dtype == "bfloat16" and run.calib_reconstruct_steps == 50
    assert run.search.scoring.fitness == "teacher" and run.eval_nets == ("a", "b")
    assert set(default_configdict().search.keys()) == set(SearchConfig().to_dict())


def test_timesteps_fp_searches_times_on_the_float_model(parts):
    """AutoDiffusion's setting: only time genes move, the float model samples,
    every genome costs the float model's 32 x 32 bits a MAC."""
    lm, reg, _, _ = parts
    setup = _setup(parts, space="timesteps_fp", budget_w_bits=32, budget_a_bits=32)
    space, problem, a = setup.space, setup.engine.problem, setup.assets
    assert space.candidates == (32,)
    assert space.searched[: space.num_steps].any()
    assert not space.searched[space.num_steps :].any()
    g = jnp.asarray(space.seed)
    ts = space.decode(g).timesteps
    got = np.clip(np.asarray(jax.jit(problem.sample)(a, g, a.noise, a.labels)), -1, 1)
    want = teacher_samples(lm.model, lm.params, lm.sched, a.noise, ts, labels=a.labels)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)  # XLA fusions
    w8 = _setup(parts, space="timesteps", seed_w_bits=8, seed_a_bits=8,
                budget_w_bits=8, budget_a_bits=8)  # fmt: skip
    q = np.asarray(jax.jit(w8.engine.problem.sample)(w8.assets, g * 0 + w8.space.seed,
                                                      a.noise, a.labels))  # fmt: skip
    assert np.abs(np.clip(q, -1, 1) - got).max() > 1e-3  # the W8A8 model is not it
    total = float(budget_lib.genome_cost(space, reg, g)[0])
    assert total == pytest.approx(budget_lib.budget_bitops(reg, 32, 32, 2), rel=1e-6)
    with pytest.raises(UserError, match="budget_w_bits=32 and search.budget_a_bits"):
        budget_lib.check_budget(space, reg, budget_lib.budget_bitops(reg, 8, 8, 2))


def test_full_precision_genome_file_round_trips_and_is_refused_unflagged(parts):
    _, reg, _, _ = parts
    bits = QuantBits.uniform(reg, 32, 32)
    d = json.loads(json.dumps(genome_to_dict([100, 600], bits, reg, (8,),
                                             full_precision=True)))  # fmt: skip
    assert d["full_precision"] is True and d["candidates"] == [32]
    assert {(v["w_bits"], v["a_bits"]) for v in d["layers"].values()} == {(32, 32)}
    g = genome_from_dict(d, reg)
    assert np.all(np.asarray(g.bits.a_bits) == 32) and list(g.timesteps) == [100, 600]
    with pytest.raises(UserError, match="every layer at 32 bits"):
        genome_to_dict([100], QuantBits.uniform(reg, 8, 8), reg, (8,),
                       full_precision=True)  # fmt: skip
    del d["full_precision"]  # 32 is no candidate width of a quantized genome
    with pytest.raises(UserError, match="candidate bit-widths"):
        genome_from_dict(d, reg)
    with pytest.raises(UserError, match="space='timesteps_fp' and timestep_mode"):
        SearchConfig(space="timesteps_fp", objective="front")
