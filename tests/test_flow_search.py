"""The search, calibration and serving of a flow-matching, class-conditional model
(a tiny DiT): continuous-time genes over the shifted grid, classifier-free
guidance counted twice in BitOPs, the fitness's int8 samples against a
hand-written guided Euler loop, and `tmpq calibrate / export / sample --genome`
with its one-line refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli_dit import dit  # noqa: F401  (the tiny trained DiT checkpoint)
from test_fitness_choices import _net, _stats

from tmpq_jax.cli import main
from tmpq_jax.diffusion.flow import (
    flow_gene_groups,
    flow_times,
    gene_times,
    grid_from_times,
)
from tmpq_jax.diffusion.guidance import guided_velocity
from tmpq_jax.errors import UserError
from tmpq_jax.flow_model import FlowModel, load_flow_model
from tmpq_jax.genome_file import genome_to_dict, write_genome
from tmpq_jax.models.dit import DiTConfig, init_params
from tmpq_jax.quant import export
from tmpq_jax.quant.calibration import calibrate, calibration_set
from tmpq_jax.quant.solver import solve
from tmpq_jax.quant.supernet import QuantBits, quantized_apply
from tmpq_jax.sampling import load_model
from tmpq_jax.search import SearchConfig, SearchRunConfig, build_setup
from tmpq_jax.search.sampler import make_sampler

CANDS = (8, 6, 4)
TINY = dict(population=4, generations=1, num_samples=12, rescore_samples=12)
TINY.update(rescore_batch=12, rescore_top_k=1, num_steps=3, budget_steps=3)
TINY.update(candidates=CANDS, seed_w_bits=8, seed_a_bits=8, budget_w_bits=8)
TINY.update(budget_a_bits=8, fitness="teacher", teacher_steps=6)


@pytest.fixture(scope="module")
def flow():
    cfg = DiTConfig(
        image_size=8, patch=2, width=16, depth=1, heads=2, num_classes=3,
        mlp_ratio=2.0, time_embed_dim=16,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    # adaLN-Zero starts at zero output: perturb so every layer matters.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    lm = FlowModel(cfg, jax.tree.unflatten(tree, leaves), {"model": "tiny-dit"})
    reg = lm.layer_registry()
    qparams, _ = calibrate(
        lm, jax.random.key(0), CANDS, 3, 4, progress=False, registry=reg
    )
    shape = (8, 8, 1)
    net = _net(2, shape)
    return lm, reg, qparams, net, _stats(net, shape)


def _setup(flow, **kw):
    lm, reg, qparams, net, stats = flow
    run = SearchRunConfig(search=SearchConfig(**{**TINY, **kw}))
    return build_setup(run, lm, reg, qparams, None, net, stats)


def test_time_genes_seed_the_shifted_grid_one_per_group():
    for n, shift in ((10, 1.0), (7, 3.0), (4, 0.5)):
        lo, hi = flow_gene_groups(n, shift, 1000)
        assert np.all(lo < hi) and np.all(hi[:-1] == lo[1:]) and lo[0] == 0
        grid = np.asarray(grid_from_times(gene_times(hi - 1, 1000)))
        np.testing.assert_allclose(grid, flow_times(n, shift), atol=1e-3)
    with pytest.raises(UserError, match="narrower than 1/1000"):
        flow_gene_groups(2000, 1.0, 1000)


def test_guidance_doubles_the_budget_and_every_genome_cost(flow):
    plain, guided = _setup(flow), _setup(flow, guidance=2.0)
    assert not plain.engine.problem.sampler.guided
    assert guided.engine.problem.sampler.guided
    assert guided.budget == pytest.approx(2 * plain.budget)
    np.testing.assert_allclose(guided.registry.macs, 2 * plain.registry.macs)
    np.testing.assert_array_equal(plain.space.seed, guided.space.seed)


def test_fitness_samples_equal_a_hand_written_guided_euler_loop(flow):
    lm, reg, qparams, _, _ = flow
    setup = _setup(flow, guidance=2.0)
    a = setup.assets
    g = jnp.asarray(setup.space.seed)
    d = setup.space.decode(g)
    got = np.asarray(jax.jit(setup.engine.problem.sample)(a, g, a.noise, a.labels))
    times = np.asarray(grid_from_times(gene_times(d.timesteps, 1000)))

    def by_hand(apply):  # CFG and Euler written out, over the genome's times
        v = guided_velocity(apply, a.labels, lm.null_label, 2.0)
        x = a.noise
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            x = x + (t_next - t) * v(x, jnp.full((x.shape[0],), t))
        return np.asarray(x)

    qmodel = export.convert(lm.params, reg, d.bits, qparams, CANDS)
    served = by_hand(
        lambda x, t, y: export.serve_apply(lm.model, qmodel, x, t, y, registry=reg)
    )
    # Equal up to rare rounding-boundary flips (the compiled scan fuses float ops
    # in another order than the unrolled loop); wrong labels, times or scale
    # would move every value.
    err = np.abs(got - served)
    assert err.mean() < 1e-4 and (err > 1e-5).mean() < 0.05, err.mean()
    wrong = by_hand(
        lambda x, t, y: export.serve_apply(
            lm.model, qmodel, x, t, (y + 1) % 3, registry=reg
        )
    )
    assert np.abs(got - wrong).mean() > 100 * err.mean()
    fake = by_hand(
        lambda x, t, y: quantized_apply(
            lm.model, {"params": lm.params}, x, t, y, bits=d.bits, registry=reg,
            qparams=qparams, candidates=CANDS,
        )
    )  # fmt: skip
    assert np.abs(got - fake).mean() < 1e-3 and np.abs(got - fake).max() < 3e-2
    assert np.bincount(np.asarray(a.labels), minlength=3).tolist() == [4, 4, 4]


def test_teacher_fitness_grows_as_bits_drop(flow):
    setup = _setup(flow, guidance=1.5)
    space, fid = setup.space, jax.jit(setup.engine.problem.fid)
    scores = []
    for w in CANDS:  # uniform W{w}A8
        g = np.array(space.seed)
        g[space.w_slice] = CANDS.index(w)
        scores.append(float(fid(setup.assets, jnp.asarray(g))))
    assert 0 < scores[0] < scores[1] < scores[2], scores


def test_calibration_set_holds_both_guidance_branches(flow):
    lm = flow[0]
    xs, ts, ys = calibration_set(lm, jax.random.key(0), 3, 4)
    assert xs.shape == (24, 8, 8, 1) and ts.shape == ys.shape == (24,)
    np.testing.assert_array_equal(xs[:12], xs[12:])
    assert set(np.asarray(ys[:12]).tolist()) <= {0, 1, 2}
    assert set(np.asarray(ys[12:]).tolist()) == {lm.null_label}
    assert float(ts.min()) > 0 and float(ts.max()) == 1.0


def test_samplers_and_solvers_refuse_the_wrong_model(flow, tiny_cfg, tiny_params):
    from tmpq_jax.diffusion.schedules import DiffusionConfig
    from tmpq_jax.sampling import LoadedModel

    lm = flow[0]
    eps = LoadedModel(tiny_cfg, DiffusionConfig(), tiny_params, {"model": "tiny"})
    cases = [
        (lambda: make_sampler(eps, "", 2.0), "not class-conditional"),
        (lambda: make_sampler(eps, "euler"), "needs a velocity-prediction"),
        (lambda: make_sampler(lm, "ddim"), "needs a eps-prediction"),
        (lambda: solve(lm, 0, CANDS, 2, 2, bias_correction=True), "min-MSE alone"),
        (lambda: lm.eps_fn(lm.params), "needs a eps-prediction"),
    ]
    uncond = FlowModel(
        DiTConfig(image_size=8, patch=2, width=16, depth=1, heads=2, num_classes=0),
        None, {},
    )  # fmt: skip
    cases.append((lambda: make_sampler(uncond, "", 2.0), "unconditional"))
    for fn, match in cases:
        with pytest.raises(UserError, match=match) as e:
            fn()
        assert "\n" not in str(e.value)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cli_calibrates_exports_and_samples_a_dit_genome(dit, tmp_path, capsys):  # noqa: F811
    calib, out = tmp_path / "calib", tmp_path / "int8"
    argv = ["calibrate", "--checkpoint", str(dit), "--out", str(calib)]
    argv += ["--candidates", "8,6", "--timesteps", "2", "--samples", "2"]
    assert main([*argv, "--no-progress"]) == 0
    lm = load_model(dit)
    assert isinstance(lm, FlowModel) and isinstance(load_flow_model(dit), FlowModel)
    reg = lm.layer_registry()
    genes = flow_gene_groups(3, 1.0, 1000)[1] - 1
    bits = QuantBits.uniform(reg, 8, 8)
    from tmpq_jax.quant.calibration import model_fingerprint

    d = genome_to_dict(
        genes, bits, reg, (8, 6), calibration=str(calib), model=str(dit),
        model_fingerprint=model_fingerprint(lm.card),
        sampler={"kind": "flow", "solver": "euler", "guidance": 2.0},
    )  # fmt: skip
    genome = write_genome(tmp_path / "g.json", d)
    assert main(["export", "--genome", str(genome), "--out", str(out)]) == 0
    assert (out / "export.json").is_file()
    npz = tmp_path / "s.npz"
    argv = ["sample", "--genome", str(genome), "--class", "1", "--num", "3"]
    assert main([*argv, "--npz", str(npz), "--no-progress"]) == 0
    # The int8 model's W8A8 samples against the float model's, same times/noise.
    from tmpq_jax.flow_sampling import sample_dit

    q = np.load(npz)["images"].astype(np.float32)
    times = np.asarray(grid_from_times(gene_times(genes, 1000)))
    ref = sample_dit(
        jax.random.key(0), lm.config, lm.params, 3, label=1, guidance=2.0,
        times=times,
    )  # fmt: skip
    ref = np.round((ref + 1) * 127.5)
    assert np.abs(q - ref).mean() < 8.0, np.abs(q - ref).mean()
    _one_line_error(
        capsys, [*argv, "--steps", "4", "--out", str(tmp_path / "x.png")],
        "carries its own times",
    )  # fmt: skip
    _one_line_error(
        capsys, [*argv[:3], "--class", "7", "--num", "2", "--out", "x.png"],
        "outside the model's label set",
    )  # fmt: skip


def test_flow_settings_are_refused_for_a_noise_prediction_model(tiny_cfg, tiny_params):
    from tmpq_jax.diffusion.schedules import DiffusionConfig
    from tmpq_jax.quant import unet_registry
    from tmpq_jax.sampling import LoadedModel
    from tmpq_jax.search.setup import search_space

    eps = LoadedModel(tiny_cfg, DiffusionConfig(), tiny_params, {"model": "tiny"})
    reg = unet_registry(tiny_cfg)
    for kw, match in (
        (dict(solver="heun"), "solver and the shift are for flow models"),
        (dict(shift=3.0), "solver and the shift are for flow models"),
        (dict(guidance=2.0), "not class-conditional"),
    ):
        with pytest.raises(UserError, match=match) as e:
            search_space(SearchConfig(**kw), eps, reg)
        assert "\n" not in str(e.value)
    assert SearchConfig(guidance=2.0, solver="heun").forwards_per_step == 4
