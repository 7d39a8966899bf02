"""Everything a search needs, loaded and checked before any work starts.

The model, its layer registry, the calibration (the shipped one when it was made
for this model and candidate set; else the search calibrates once and keeps it in
the workdir), the feature net and its test statistics, the fixed noise batch and
the BitOPs budget (refused before any work when no genome of the box can meet it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from tmpq_jax.errors import UserError
from tmpq_jax.metrics import (
    REF_STATS_FILE,
    FeatureNet,
    load_feature_net,
    load_reference_stats,
)
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.quant.calibration_io import load_calibration, save_calibration
from tmpq_jax.quant.registry import LayerRegistry, unet_registry
from tmpq_jax.quant.solver import solve
from tmpq_jax.quant.supernet import QParams
from tmpq_jax.sampling import LoadedModel, load_model
from tmpq_jax.search import budget as budget_lib
from tmpq_jax.search import sharding
from tmpq_jax.search.config import SearchRunConfig
from tmpq_jax.search.engine import Engine
from tmpq_jax.search.fitness import Assets, Problem
from tmpq_jax.search.space import GenomeSpace
from tmpq_jax.search.strategies import make_strategy
from tmpq_jax.serving import SHIPPED_CALIBRATION

NOISE_STREAM = 0x5EED  # the fitness noise batch: fixed, whatever the search seed


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    run: SearchRunConfig
    lm: LoadedModel
    registry: LayerRegistry
    qparams: QParams | None
    calibration_path: Path | None
    engine: Engine
    assets: Assets
    budget: float
    stats: dict  # the feature net's reference statistics (for rescoring)

    @property
    def space(self) -> GenomeSpace:
        return self.engine.problem.space


def resolve_qparams(run: SearchRunConfig, lm, registry, workdir: Path, progress: bool):
    """(QParams, path): the named calibration, else the shipped one if it fits this
    model and candidate set, else one made now and kept in `workdir/calibration`."""
    cands = run.search.candidates
    fp = model_fingerprint(lm.card)
    if run.calibration is not None:
        return load_calibration(run.calibration, registry, cands, fp)[0], Path(
            run.calibration
        )
    for path in (workdir / "calibration", SHIPPED_CALIBRATION):
        try:
            return load_calibration(path, registry, cands, fp)[0], path
        except UserError:
            continue
    path = workdir / "calibration"
    if jax.process_count() > 1:  # every process would write its own calibration
        raise UserError(
            f"no calibration for this model and candidates {list(cands)}: run "
            f"`tmpq calibrate --out DIR --candidates {','.join(map(str, cands))}` in "
            "one process first, then pass --config.calibration=DIR."
        )
    print(f"no calibration for this model and candidates {list(cands)}: calibrating")
    qparams, settings, _ = solve(
        lm,
        0,
        cands,
        run.calib_timesteps,
        run.calib_samples,
        registry=registry,
        progress=progress,
    )
    save_calibration(path, qparams, registry, cands, settings, fp)
    return qparams, path


def prepare(run: SearchRunConfig, workdir: Path, progress: bool = True) -> Setup:
    """Loads the model, feature net, statistics and calibration named by `run`."""
    lm = load_model(run.model)
    return prepare_model(run, lm, workdir, unet_registry(lm.config), progress)


def prepare_model(
    run: SearchRunConfig,
    lm: LoadedModel,
    workdir: str | Path,
    registry: LayerRegistry | None = None,
    progress: bool = True,
) -> Setup:
    """`prepare` for a model in hand, e.g. your own linen model wrapped by
    `LoadedModel.from_module` (`run.model` is not read). `registry`: default, the
    model's layers traced at batch 1. The feature net must take the model's images;
    the calibration is `run.calibration`, else one kept in `workdir`, else made."""
    cfg, workdir = run.search, Path(workdir)
    registry = registry if registry is not None else lm.layer_registry()
    # The budget is checked before any loading or calibration work.
    space = GenomeSpace.build(cfg, registry, lm.diffusion.num_timesteps)
    budget_lib.check_budget(space, registry, _budget(cfg, registry))
    net = load_feature_net(run.feature_net)
    c = lm.config
    shape = (c.image_size, c.image_size, c.channels)
    if shape != tuple(net.image_shape):
        raise UserError(
            f"the model makes {'x'.join(map(str, shape))} images but the feature net "
            f"{net.path} takes {'x'.join(map(str, net.image_shape))}; make images of "
            "that shape, or pass feature_net=DIR: a classifier for yours, with its "
            "ref_stats.npz."
        )
    stats = load_reference_stats(Path(net.path) / REF_STATS_FILE, net)
    qparams, calib_path = resolve_qparams(run, lm, registry, workdir, progress)
    return build_setup(run, lm, registry, qparams, calib_path, net, stats)


def _budget(cfg, registry) -> float:
    return budget_lib.budget_bitops(
        registry, cfg.budget_w_bits, cfg.budget_a_bits, cfg.budget_steps
    )


def build_setup(
    run: SearchRunConfig,
    lm: LoadedModel,
    registry: LayerRegistry,
    qparams: QParams | None,
    calibration_path: Path | None,
    net: FeatureNet,
    stats: dict,
    devices: Sequence[jax.Device] | None = None,
) -> Setup:
    """A `Setup` from loaded parts (tests build tiny ones this way), placed on
    `devices` (default: every device of every process)."""
    cfg = run.search
    space = GenomeSpace.build(cfg, registry, lm.diffusion.num_timesteps)
    budget = _budget(cfg, registry)
    budget_lib.check_budget(space, registry, budget)
    for name in ("num_samples", "rescore_samples"):
        if getattr(cfg, name) <= net.feature_dim:
            raise UserError(
                f"search.{name}={getattr(cfg, name)}: FID needs more samples than the "
                f"{net.feature_dim} feature dims; use at least {net.feature_dim + 1}."
            )
    static_ranges = qparams is not None and qparams.act_bound is not None
    mesh = sharding.search_mesh(cfg, devices, static_ranges)
    c = lm.config
    noise = jax.random.normal(
        jax.random.key(NOISE_STREAM),
        (cfg.num_samples, c.image_size, c.image_size, c.channels),
    )
    assets = Assets(
        params=lm.params,
        qparams=qparams,
        sched=lm.sched,
        net=net,
        mu_ref=jnp.asarray(stats["mu_test"], jnp.float32),
        sigma_ref=jnp.asarray(stats["sigma_test"], jnp.float32),
        sqrt_sigma_ref=jnp.asarray(stats["sqrt_sigma_test"], jnp.float32),
        noise=noise,
    )
    problem = Problem(
        lm.model,
        registry,
        space,
        cfg.candidates,
        cfg.candidate_chunk,
        cfg.sample_chunk,
        cfg.conv_jnp_dtype,
    )
    assets = sharding.replicate(assets, mesh)
    engine = Engine(cfg, problem, make_strategy(cfg, space), budget, mesh)
    return Setup(
        run, lm, registry, qparams, calibration_path, engine, assets, budget, stats
    )
