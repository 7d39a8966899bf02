"""Everything a search needs, loaded and checked before any work starts.

The model, its layer registry, the calibration (the shipped one when it was made
for this model and candidate set; else the search calibrates once and keeps it in
the workdir), the feature net and its test statistics, the fixed noise batch and
the BitOPs budget (refused before any work when no genome of the box can meet it).
"""

from __future__ import annotations

import dataclasses
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
from tmpq_jax.quant.calibration import calibrate, model_fingerprint
from tmpq_jax.quant.calibration_io import load_calibration, save_calibration
from tmpq_jax.quant.registry import LayerRegistry, unet_registry
from tmpq_jax.quant.supernet import QParams
from tmpq_jax.sampling import LoadedModel, load_model
from tmpq_jax.search import budget as budget_lib
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
    print(f"no calibration for this model and candidates {list(cands)}: calibrating")
    qparams, info = calibrate(
        lm,
        jax.random.key(0),
        cands,
        run.calib_timesteps,
        run.calib_samples,
        progress,
        registry=registry,
    )
    settings = {k: info[k] for k in ("num_timesteps", "num_samples")}
    save_calibration(path, qparams, registry, cands, settings, fp)
    return qparams, path


def prepare(run: SearchRunConfig, workdir: Path, progress: bool = True) -> Setup:
    """Loads the model, feature net, statistics and calibration named by `run`."""
    cfg = run.search
    lm = load_model(run.model)
    registry = unet_registry(lm.config)
    # The budget is checked before any loading or calibration work.
    space = GenomeSpace.build(cfg, registry, lm.diffusion.num_timesteps)
    budget_lib.check_budget(space, registry, _budget(cfg, registry))
    net = load_feature_net(run.feature_net)
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
) -> Setup:
    """A `Setup` from loaded parts (tests build tiny ones this way)."""
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
        lm.model, registry, space, cfg.candidates, cfg.candidate_chunk, cfg.sample_chunk
    )
    engine = Engine(cfg, problem, make_strategy(cfg, space), budget)
    return Setup(
        run, lm, registry, qparams, calibration_path, engine, assets, budget, stats
    )
