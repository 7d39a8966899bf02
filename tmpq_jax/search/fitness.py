"""Fitness on device: a candidate's samples from one fixed noise batch, scored.

For each genome: decode -> CONVERT its kernels once at their traced bits
(`export.freeze`, calibrated results selected, never recomputed) -> the sampler
(`search/sampler.py`: DDIM, or Euler/Heun with guidance for a flow model; a
`lax.scan` over its traced times) serving them (`export.serve_apply`, equal
bit for bit to the fake-quant `quantized_apply`) -> a score (`search.fitness`):

* `fid`: the fitness net's features -> FID against its TRAIN-split statistics
  (`fid_from_features`, jittable). The test split is never read by a search: it
  is what every reported figure uses (`evaluation.py`).
* `ensemble`: the FIDs in several feature spaces (the fitness net and
  `ensemble_nets`, never an evaluation net), each rescaled to the first net's
  units by the ratio of their train covariances' traces, averaged: a genome that
  games one space pays in the others.
* `teacher`: the squared distance of each sample to the full-precision model's
  many-step sample from the same noise (`Assets.teacher`, made once per search),
  relative to the teacher samples' spread, in pixels plus
  `teacher_feature_weight` times the same in the fitness net's features. It needs
  no data statistics; with weight 0, no feature net either. 0 for the teacher's
  own samples.

A population is mapped in chunks of `candidate_chunk` vmapped genomes
(`lax.map(batch_size=...)`), so memory stays bounded, and samples can be drawn
`sample_chunk` at a time (the last chunk padded). NaN/inf samples give `WORST_FID`,
never a crash. Big arrays travel as arguments (`Assets`), not constants.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from tmpq_jax.diffusion.schedules import NoiseSchedule
from tmpq_jax.errors import UserError
from tmpq_jax.metrics import FeatureNet, fid_from_features
from tmpq_jax.quant import export
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QParams, check_bits
from tmpq_jax.search.sampler import DDIM
from tmpq_jax.search.space import GenomeSpace

WORST_FID = 1e4  # the fitness of a candidate whose samples are not finite


@struct.dataclass
class Assets:
    """Everything a fitness evaluation reads, as one pytree of device arrays."""

    params: Any  # the UNet's params
    qparams: QParams
    sched: NoiseSchedule
    net: FeatureNet | None  # the fitness net (None: teacher in pixels only)
    # The fitness net's TRAIN-split statistics (never the test split's).
    mu_ref: jax.Array | None
    sigma_ref: jax.Array | None
    sqrt_sigma_ref: jax.Array | None
    noise: jax.Array  # the fixed noise batch x_T: [S, H, W, C]
    # ensemble: the other nets and their train-split (mu, sigma, sqrt_sigma), and
    # each member's factor into the first net's units.
    extra_nets: tuple[FeatureNet, ...] = ()
    extra_refs: tuple[tuple[jax.Array, jax.Array, jax.Array], ...] = ()
    ensemble_scale: jax.Array | None = None  # [1 + len(extra_nets)]
    # teacher: its samples from `noise` (clipped), their features (or None) and
    # their spreads [pixels, features] (mean squared distance to their mean).
    teacher: jax.Array | None = None
    teacher_features: jax.Array | None = None
    teacher_spread: jax.Array | None = None
    # A class-conditional model: the labels of `noise`'s rows (class-balanced)
    # and the guidance scale (f32[]; see `search/sampler.py`).
    labels: jax.Array | None = None
    guidance: jax.Array | None = None


def map_in_chunks(fn, x, chunk: int) -> jax.Array:
    """`fn` over the leading axis of `x` (an array, or a pytree of arrays with one
    leading size), `chunk` rows at a time (`lax.map`; 0 or >= len: all at once).
    A last partial chunk is filled with repeats of real rows (finite, so a NaN
    check stays meaningful) and its extra outputs dropped."""
    n = jax.tree.leaves(x)[0].shape[0]
    if not chunk or chunk >= n:
        return fn(x)
    k = -(-n // chunk)

    def split(a):
        a = jnp.concatenate([a, a[: k * chunk - n]]) if k * chunk > n else a
        return a.reshape(k, chunk, *a.shape[1:])

    out = jax.lax.map(fn, jax.tree.map(split, x))
    return out.reshape(k * chunk, *out.shape[2:])[:n]


def chunk_memory(fixed: float, per_candidate: float, limit: int, chunk=None) -> int:
    """The largest `candidate_chunk` whose population program fits `limit` bytes,
    given its bytes outside the candidates (`fixed`) and those each vmapped candidate
    adds (both from XLA's memory analysis of the compiled program); a `chunk` beyond
    it is refused in one line."""
    largest = max(int((limit - fixed) // max(per_candidate, 1.0)), 0)
    if chunk is not None and chunk > largest:
        raise UserError(
            f"search.candidate_chunk={chunk} does not fit in the device's "
            f"{limit / 2**30:.1f} GiB ({per_candidate / 2**30:.2f} GiB a candidate); "
            + (f"the largest that fits is {largest}." if largest else "not even 1 "
               "fits: lower search.num_samples or set search.sample_chunk.")
        )  # fmt: skip
    return largest


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """The static half: the model's code, its layers, the genome box."""

    model: nn.Module
    registry: LayerRegistry
    space: GenomeSpace
    candidates: tuple[int, ...]
    candidate_chunk: int = 1
    sample_chunk: int = 0
    conv_dtype: Any = None  # integer-valued conv operands in this dtype: see numerics
    fitness: str = "fid"  # fid | ensemble | teacher (see the module doc)
    teacher_feature_weight: float = 0.0  # the search's default (config.py)
    sampler: Any = DDIM()  # search/sampler.py: DDIM, or Flow for velocity models
    full_precision: bool = False  # space=timesteps_fp: the float model, no bits

    def sample(
        self, assets: Assets, genome: jax.Array, x_T: jax.Array, labels=None
    ) -> jax.Array:
        """Images of one genome from x_T (unclipped x_0); `labels`: the rows'
        classes (a class-conditional model only)."""
        d = self.space.decode(genome)
        if self.full_precision:  # the float model, as the teacher runs it
            model_fn = float_fn(self.model, assets.params)
        else:
            model_fn = self._served_fn(assets, d.bits)

        def run(xy):
            x, y = xy
            return self.sampler(
                model_fn, x, d.timesteps, assets.sched, y, assets.guidance
            )

        return map_in_chunks(run, (x_T, labels), self.sample_chunk)

    def _served_fn(self, assets: Assets, bits):
        """(x, t, *y) -> the genome's int8 model. CONVERT once per genome, outside
        the step scan: every step then reads the frozen int8 kernels (SERVE), bit
        for bit the fake-quant path's output."""
        check_bits(bits, self.registry, self.candidates)
        qmodel = export.freeze(assets.params, self.registry, bits, assets.qparams)

        def model_fn(x, t, *y):
            return export.serve_apply(
                self.model,
                qmodel,
                x,
                t,
                *y,
                registry=self.registry,
                conv_dtype=self.conv_dtype,
            )

        return model_fn

    @functools.cached_property
    def jitted_sample(self):
        """`sample`, jitted once per problem (re-scoring reuses it for every genome)."""
        return jax.jit(self.sample)

    def fid(self, assets: Assets, genome: jax.Array, axis=None) -> jax.Array:
        """The fitness of one genome (named `fid` for the archive's column; it is
        the `fitness` score). `axis`: the mesh axis `assets.noise` is split over
        (inside `shard_map`): every part's features (or images) are gathered
        before the score."""
        x0 = self.sample(assets, genome, assets.noise, assets.labels)
        finite = jnp.all(jnp.isfinite(x0))
        images = jnp.clip(jnp.where(finite, x0, 0.0), -1.0, 1.0)
        if axis is not None:
            finite = jax.lax.psum((~finite).astype(jnp.int32), axis) == 0
        f = self.score_images(assets, images, axis)
        return jnp.where(finite & jnp.isfinite(f), f, WORST_FID)

    def score_images(self, assets: Assets, images: jax.Array, axis=None):
        """The fitness of images (clipped to [-1, 1]) made from `assets.noise`."""
        gather = (
            (lambda a: a)
            if axis is None
            else (lambda a: jax.lax.all_gather(a, axis, tiled=True))
        )
        if self.fitness == "teacher":
            return teacher_distance(gather(images), assets, self.teacher_feature_weight)
        nets = (assets.net, *assets.extra_nets)
        refs = ((assets.mu_ref, assets.sigma_ref, assets.sqrt_sigma_ref),)
        refs = refs + tuple(assets.extra_refs)
        if self.fitness == "fid":
            nets, refs = nets[:1], refs[:1]
        values = jnp.stack(
            [
                fid_from_features(gather(net.features(images)), *ref)
                for net, ref in zip(nets, refs, strict=True)
            ]
        )
        if self.fitness == "fid":
            return values[0]
        return jnp.mean(values * assets.ensemble_scale)

    def population_fid(self, assets: Assets, genomes: jax.Array, axis=None):
        """float32[P] for int32[P, D], `candidate_chunk` genomes vmapped at a time
        (`axis`: see `fid`)."""
        return jax.lax.map(
            lambda g: self.fid(assets, g, axis),
            genomes,
            batch_size=min(self.candidate_chunk, genomes.shape[0]),
        )


def spread(x: jax.Array) -> jax.Array:
    """Mean squared distance of the rows of x [N, ...] to their mean, per value."""
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    return jnp.mean((x - jnp.mean(x, axis=0)) ** 2)


def teacher_distance(images, assets: Assets, feature_weight: float) -> jax.Array:
    """Mean squared distance of `images` to `assets.teacher` (paired by noise),
    over the teacher's spread; plus `feature_weight` x the same in the fitness
    net's features. 0 exactly for the teacher's own samples."""
    t = assets.teacher.astype(jnp.float32)
    d = jnp.mean((images.astype(jnp.float32) - t) ** 2) / assets.teacher_spread[0]
    if feature_weight:
        f = assets.net.features(images)
        ft = assets.teacher_features
        d = d + feature_weight * jnp.mean((f - ft) ** 2) / assets.teacher_spread[1]
    return d


def float_fn(model: nn.Module, params):
    """(x, t, *y) -> the float model's output (labels y: a conditional model)."""
    return lambda x, t, *y: model.apply({"params": params}, x, t, *y)


def teacher_samples(
    model: nn.Module,
    params,
    sched: NoiseSchedule,
    noise,
    timesteps,
    chunk: int = 0,
    *,
    sampler=None,
    labels=None,
    guidance=None,
) -> jax.Array:
    """The full-precision model's samples from `noise` (and `labels`) over
    `timesteps` with `sampler` (default: DDIM), clipped to [-1, 1]: the teacher,
    made once per search."""
    sampler = DDIM() if sampler is None else sampler

    def run(xy):
        return sampler(
            float_fn(model, params), xy[0], timesteps, sched, xy[1], guidance
        )

    out = jax.jit(lambda xy: map_in_chunks(run, xy, chunk))((noise, labels))
    return jnp.clip(out, -1.0, 1.0)
