"""Everything a search needs, loaded and checked before any work starts.

The model, its layer registry, the calibration (the shipped one when it was made
for this model and candidate set; else the search calibrates once, with the
config's `calib_*` settings, and keeps it in the workdir), the fitness's feature
nets with their reference statistics, the evaluation nets, the fixed noise batch,
the teacher's samples (fitness or selection `teacher`) and the BitOPs budget
(refused before any work when no genome of the box can meet it).

Two kinds of feature nets, never mixed:

* fitness nets (`feature_net`, and `ensemble_nets` for the ensemble): what the
  search optimizes and selects with, always against the TRAIN split's statistics;
* evaluation nets (`eval_nets`): never given to a fitness or a selection, only to
  the reported figures (`Setup.report`), which use the TEST split alone.

An evaluation net that is also a fitness net is refused, as is a net made for
other data or another image shape than the model's (`check_model_data`).

`Setup.select_score` and `Setup.report` are the hooks for the final top-k: the
first ranks (train split or teacher), the second reports (test split only).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.checkpoint import CHECKPOINTS_DIR
from tmpq_jax.diffusion.flow import flow_gene_groups
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.errors import UserError
from tmpq_jax.evaluation import Evaluator, default_eval_nets
from tmpq_jax.metrics import (
    REF_STATS_FILE,
    FeatureNet,
    fid,
    load_feature_net,
    load_reference_stats,
)
from tmpq_jax.metrics.feature_net import check_image_shape, check_model_data
from tmpq_jax.metrics.reference import fitness_stats
from tmpq_jax.metrics.spaces import pixel_features
from tmpq_jax.models.unet import UNetConfig
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.quant.calibration_io import load_calibration, save_calibration
from tmpq_jax.quant.registry import LayerRegistry, unet_registry
from tmpq_jax.quant.solver import solve
from tmpq_jax.quant.supernet import QParams
from tmpq_jax.sampling import LoadedModel, load_model
from tmpq_jax.search import budget as budget_lib
from tmpq_jax.search import sharding
from tmpq_jax.search.config import SearchConfig, SearchRunConfig
from tmpq_jax.search.engine import Engine
from tmpq_jax.search.fitness import Assets, Problem, spread, teacher_samples
from tmpq_jax.search.sampler import labels_for, make_sampler
from tmpq_jax.search.space import GenomeSpace
from tmpq_jax.search.strategies import make_strategy
from tmpq_jax.serving import SHIPPED_CALIBRATION

NOISE_STREAM = 0x5EED  # the fitness noise batch: fixed, whatever the search seed
LABEL_STREAM = 0x1ABE1  # its class labels (a class-conditional model)
# The shipped nets besides the fitness classifier (checkpoints/, configs/eval_nets.py).
SHIPPED_ENSEMBLE = (CHECKPOINTS_DIR / "fmnist_classifier_b",)

NetStats = tuple[FeatureNet, dict]  # a net and its reference statistics


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
    stats: dict  # the fitness net's reference statistics
    # The fitness's other nets (ensemble) and the evaluation nets, with their stats.
    ensemble: tuple[NetStats, ...] = ()
    eval_nets: tuple[NetStats, ...] = ()
    teacher_timesteps: np.ndarray | None = None
    # The teacher's assets on the last noise it was asked for: every top-k genome
    # is re-scored on the same fresh noise, so its teacher run is made once.
    _teacher_memo: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @property
    def space(self) -> GenomeSpace:
        return self.engine.problem.space

    @property
    def cfg(self) -> SearchConfig:
        return self.run.search

    # -- the final top-k: selection (train split / teacher) and report (test) --
    def select_score(self, images, x_T=None, labels=None) -> float:
        """The score the final top-k are ranked by (`search.select`; lower is
        better), of images in [-1, 1]: never a test-split statistic nor an
        evaluation net. `x_T` (and `labels`): what the images were made from
        (teacher)."""
        kind = self.cfg.select if self.cfg.select != "fitness" else self.cfg.fitness
        images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
        if not np.isfinite(images).all():
            return float("inf")
        if kind == "teacher":
            if x_T is None:
                raise UserError("selection by teacher needs the images' noise x_T.")
            return self._teacher_score(images, x_T, labels)
        if kind == "pixels":
            ref = fitness_stats(self.stats, "pixels_")
            feats = np.asarray(pixel_features(images))
            return fid(feats, ref["mu"], ref["sigma"], ref["sqrt_sigma"])
        members = [(self.assets.net, self.stats)]
        if kind == "ensemble":
            members += list(self.ensemble)
        values = []
        for net, stats in members:
            ref = fitness_stats(stats)
            feats = net.extract(images).features
            values.append(fid(feats, ref["mu"], ref["sigma"], ref["sqrt_sigma"]))
        if kind == "fid":
            return values[0]
        return float(np.mean(np.asarray(values) * ensemble_scale(self._stats())))

    def _stats(self) -> list[dict]:
        return [self.stats, *(s for _, s in self.ensemble)]

    def _teacher_score(self, images, x_T, labels=None) -> float:
        from tmpq_jax.search.fitness import teacher_distance

        w = self.cfg.teacher_feature_weight
        return float(teacher_distance(jnp.asarray(images), self._teacher(x_T, labels), w))

    def _teacher(self, x_T, labels=None) -> Assets:
        """The teacher's assets for noise `x_T` (and labels), made once per noise
        (the memo is this Setup's own: its config and model never change)."""
        lm, c, x_T = self.lm, self.cfg, np.ascontiguousarray(x_T)
        digest = hashlib.sha256(x_T.tobytes())
        digest.update(b"" if labels is None else np.ascontiguousarray(labels).tobytes())
        key = (x_T.shape, digest.hexdigest())
        if key not in self._teacher_memo:
            ts = self.teacher_timesteps
            if ts is None:
                ts = teacher_timesteps(self.cfg, lm)
            teacher = teacher_samples(
                lm.model, lm.params, lm.sched, x_T, ts, c.sample_chunk,
                sampler=self.engine.problem.sampler, labels=labels,
                guidance=self.assets.guidance,
            )  # fmt: skip
            self._teacher_memo.clear()  # one noise at a time: bounded memory
            a = teacher_assets(self.assets.net, teacher, c.teacher_feature_weight)
            self._teacher_memo[key] = a
        return self._teacher_memo[key]

    @property
    def evaluator(self) -> Evaluator:
        """Reports with the test split only: the fitness net's FID (comparable to
        earlier tables, but the search optimized it), every evaluation net's, the
        pixels' and precision/recall."""
        return Evaluator.from_parts(
            self.assets.net, self.stats, eval_nets=self.eval_nets
        )

    def report(self, images, key=None) -> dict:
        return self.evaluator.score(images, key)


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
        run.calib_seed,
        cands,
        run.calib_timesteps,
        run.calib_samples,
        reconstruct_steps=run.calib_reconstruct_steps,
        bias_correction=run.calib_bias_correction,
        registry=registry,
        progress=progress,
    )
    save_calibration(path, qparams, registry, cands, settings, fp)
    return qparams, path


def prepare(run: SearchRunConfig, workdir: Path, progress: bool = True) -> Setup:
    """Loads the model, feature nets, statistics and calibration named by `run`."""
    lm = load_model(run.model)
    registry = unet_registry(lm.config) if isinstance(lm.config, UNetConfig) else None
    return prepare_model(run, lm, workdir, registry, progress)


def _model_shape(lm) -> tuple[int, int, int]:
    c = lm.config
    return (c.image_size, c.image_size, c.channels)


def load_net(path, lm, role: str) -> NetStats:
    """A feature net and its statistics, checked against the model's images and
    data (one-line refusals)."""
    net = load_feature_net(path)
    check_image_shape(net, _model_shape(lm))
    check_model_data(net, lm.card)
    stats = load_reference_stats(Path(net.path) / REF_STATS_FILE, net)
    if role != "evaluation":
        fitness_stats(stats)  # a search needs the train split's
    return net, stats


def prepare_model(
    run: SearchRunConfig,
    lm: LoadedModel,
    workdir: str | Path,
    registry: LayerRegistry | None = None,
    progress: bool = True,
) -> Setup:
    """`prepare` for a model in hand, e.g. your own linen model wrapped by
    `LoadedModel.from_module` (`run.model` is not read). `registry`: default, the
    model's layers traced at batch 1. The feature nets must take the model's images
    and come from its data; the calibration is `run.calibration`, else one kept in
    `workdir`, else made."""
    cfg, workdir = run.search, Path(workdir)
    registry = registry if registry is not None else lm.layer_registry()
    # The budget is checked before any loading or calibration work.
    _, space, per_step = search_space(cfg, lm, registry)
    budget_lib.check_budget(space, per_step, _budget(cfg, per_step))
    net, stats = load_net(run.feature_net, lm, "fitness")
    ensemble = ()
    if cfg.fitness == "ensemble" or cfg.select == "ensemble":
        paths = run.ensemble_nets or tuple(str(p) for p in SHIPPED_ENSEMBLE)
        ensemble = tuple(load_net(p, lm, "fitness") for p in paths)
    eval_paths = run.eval_nets if run.eval_nets is not None else default_eval_nets(lm)
    evals = tuple(load_net(p, lm, "evaluation") for p in eval_paths)
    qparams, calib_path = None, None  # a float search quantizes nothing
    if cfg.space != "timesteps_fp":
        qparams, calib_path = resolve_qparams(run, lm, registry, workdir, progress)
    return build_setup(
        run, lm, registry, qparams, calib_path, net, stats,
        ensemble=ensemble, eval_nets=evals,
    )  # fmt: skip


def search_space(cfg: SearchConfig, lm, registry: LayerRegistry):
    """(sampler, genome space, registry with MACs per sampling step): how the
    model samples (`search/sampler.py`), which decides the time genes (integer
    steps, or a flow model's times grouped by the shifted grid) and how many
    forwards a step costs (classifier-free guidance: 2)."""
    flow = lm.prediction == "velocity"
    if not flow and (cfg.solver, cfg.shift) != ("euler", 1.0):
        raise UserError(
            f"search.solver={cfg.solver!r}, shift={cfg.shift}: the solver and the "
            "shift are for flow models; this model predicts noise and samples with "
            "DDIM, so leave them at euler and 1."
        )
    sampler = make_sampler(lm, cfg.solver if flow else "", cfg.guidance)
    space = GenomeSpace.build(
        cfg, registry, lm.diffusion.num_timesteps, cfg.shift if flow else None
    )
    return sampler, space, registry.per_step(sampler.evals_per_step)


def _budget(cfg, registry) -> float:
    return budget_lib.budget_bitops(
        registry, cfg.budget_w_bits, cfg.budget_a_bits, cfg.budget_steps
    )


def check_disjoint(fitness_nets: Sequence[FeatureNet], eval_nets: Sequence[FeatureNet]):
    """Refuses an evaluation net that is also a fitness net (same params)."""
    seen = {n.fingerprint(): n for n in fitness_nets}
    for e in eval_nets:
        if e.fingerprint() in seen:
            raise UserError(
                f"the evaluation net {e.path} is the fitness net "
                f"{seen[e.fingerprint()].path}: an evaluation space must be one the "
                "search never sees; pick another evaluation net."
            )


def ensemble_scale(stats: Sequence[dict]) -> np.ndarray:
    """Each member's factor into the first member's FID units: the ratio of the
    traces of their train covariances."""
    tr = np.array([np.trace(fitness_stats(s)["sigma"]) for s in stats], np.float64)
    return (tr[0] / tr).astype(np.float32)


def teacher_timesteps(cfg: SearchConfig, lm) -> np.ndarray:
    T = lm.diffusion.num_timesteps
    if lm.prediction == "velocity":  # the shifted grid of teacher_steps times
        return flow_gene_groups(cfg.teacher_steps, cfg.shift, T)[1] - 1
    if cfg.teacher_steps > T:
        raise UserError(
            f"search.teacher_steps={cfg.teacher_steps} exceeds the model's {T} "
            "diffusion steps."
        )
    return np.asarray(timestep_schedule(cfg.teacher_schedule, cfg.teacher_steps, T))


def teacher_assets(net, teacher, feature_weight: float) -> Assets:
    """The teacher's fields of `Assets` (the others None): its samples, their
    features and spreads."""
    feats = net.features(teacher) if feature_weight else None
    spreads = jnp.stack(
        [spread(teacher), spread(feats) if feats is not None else jnp.float32(1.0)]
    )
    return Assets(
        params=None,
        qparams=None,
        sched=None,
        net=net,
        mu_ref=None,
        sigma_ref=None,
        sqrt_sigma_ref=None,
        noise=None,
        teacher=teacher,
        teacher_features=feats,
        teacher_spread=jnp.maximum(spreads, 1e-12),
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
    *,
    ensemble: Sequence[NetStats] = (),
    eval_nets: Sequence[NetStats] = (),
) -> Setup:
    """A `Setup` from loaded parts (tests build tiny ones this way), placed on
    `devices` (default: every device of every process). `stats` (and each
    ensemble member's) must hold the train split's statistics: they are all the
    fitness reads."""
    cfg = run.search
    sampler, space, registry = search_space(cfg, lm, registry)
    budget = _budget(cfg, registry)
    budget_lib.check_budget(space, registry, budget)
    ensemble, eval_nets = tuple(ensemble), tuple(eval_nets)
    if cfg.fitness == "ensemble" and not ensemble:
        raise UserError(
            "search.fitness='ensemble' needs at least one more fitness net than the "
            "feature net (ensemble_nets)."
        )
    check_disjoint([net, *(n for n, _ in ensemble)], [n for n, _ in eval_nets])
    dims = [net.feature_dim, *(n.feature_dim for n, _ in ensemble)]
    by_fid = cfg.fitness != "teacher"
    select = cfg.select if cfg.select != "fitness" else cfg.fitness
    for name, used in (  # the top-k may be selected by an FID
        ("num_samples", by_fid),
        ("rescore_samples", by_fid or select in ("fid", "ensemble")),
        ("race_samples", by_fid and cfg.race_samples),
    ):
        if used and getattr(cfg, name) <= max(dims):
            raise UserError(
                f"search.{name}={getattr(cfg, name)}: FID needs more samples than "
                f"the {max(dims)} feature dims; use at least {max(dims) + 1}."
            )
    static_ranges = qparams is not None and qparams.act_bound is not None
    mesh = sharding.search_mesh(cfg, devices, static_ranges)
    c = lm.config
    noise = jax.random.normal(
        jax.random.key(NOISE_STREAM),
        (cfg.num_samples, c.image_size, c.image_size, c.channels),
    )
    labels = labels_for(sampler, jax.random.key(LABEL_STREAM), cfg.num_samples)
    guidance = jnp.float32(cfg.guidance) if getattr(sampler, "guided", 0) else None
    ref = fitness_stats(stats)  # the TRAIN split: never the test split's
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    extra_refs = tuple(
        tuple(f32(fitness_stats(s)[k]) for k in ("mu", "sigma", "sqrt_sigma"))
        for _, s in ensemble
    )
    ts_teacher, teacher = None, {}
    if cfg.fitness == "teacher" or cfg.select == "teacher":
        ts_teacher = teacher_timesteps(cfg, lm)
    if cfg.fitness == "teacher":
        samples = teacher_samples(
            lm.model, lm.params, lm.sched, noise, ts_teacher, cfg.sample_chunk,
            sampler=sampler, labels=labels, guidance=guidance,
        )  # fmt: skip
        t = teacher_assets(net, samples, cfg.teacher_feature_weight)
        teacher = dict(
            teacher=t.teacher,
            teacher_features=t.teacher_features,
            teacher_spread=t.teacher_spread,
        )
    assets = Assets(
        params=lm.params,
        qparams=qparams,
        sched=lm.sched,
        net=net,
        mu_ref=f32(ref["mu"]),
        sigma_ref=f32(ref["sigma"]),
        sqrt_sigma_ref=f32(ref["sqrt_sigma"]),
        noise=noise,
        extra_nets=tuple(n for n, _ in ensemble),
        extra_refs=extra_refs,
        ensemble_scale=jnp.asarray(ensemble_scale([stats, *(s for _, s in ensemble)]))
        if ensemble
        else None,
        **teacher,
        labels=labels,
        guidance=guidance,
    )
    problem = Problem(
        lm.model,
        registry,
        space,
        cfg.candidates,
        cfg.candidate_chunk,
        cfg.sample_chunk,
        cfg.conv_jnp_dtype,
        fitness=cfg.fitness,
        teacher_feature_weight=cfg.teacher_feature_weight,
        sampler=sampler,
        full_precision=cfg.space == "timesteps_fp",
    )
    assets = sharding.replicate(assets, mesh)
    engine = Engine(cfg, problem, make_strategy(cfg, space), budget, mesh)
    return Setup(
        run,
        lm,
        registry,
        qparams,
        calibration_path,
        engine,
        assets,
        budget,
        stats,
        ensemble=ensemble,
        eval_nets=eval_nets,
        teacher_timesteps=ts_teacher,
    )
