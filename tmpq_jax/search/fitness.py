"""Fitness on device: a candidate's samples from one fixed noise batch, scored by FID.

For each genome: decode -> CONVERT its kernels once at their traced bits
(`export.freeze`, calibrated results selected, never recomputed) -> DDIM
(`lax.scan` over its traced timesteps) serving them (`export.serve_apply`, equal
bit for bit to the fake-quant `quantized_apply`) -> the FMNIST classifier's
features -> FID against the test statistics (`fid_from_features`, jittable). A
population is mapped in chunks of `candidate_chunk` vmapped genomes
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

from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.diffusion.schedules import NoiseSchedule
from tmpq_jax.metrics import FeatureNet, fid_from_features
from tmpq_jax.quant import export
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QParams, check_bits
from tmpq_jax.search.space import GenomeSpace

WORST_FID = 1e4  # the fitness of a candidate whose samples are not finite


@struct.dataclass
class Assets:
    """Everything a fitness evaluation reads, as one pytree of device arrays."""

    params: Any  # the UNet's params
    qparams: QParams
    sched: NoiseSchedule
    net: FeatureNet
    mu_ref: jax.Array
    sigma_ref: jax.Array
    sqrt_sigma_ref: jax.Array
    noise: jax.Array  # the fixed noise batch x_T: [S, H, W, C]


def map_in_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
    """`fn` over the leading axis of `x`, `chunk` rows at a time (`lax.map`; 0 or
    >= len: all at once). A last partial chunk is filled with repeats of real rows
    (finite, so a NaN check stays meaningful) and its extra outputs dropped."""
    n = x.shape[0]
    if not chunk or chunk >= n:
        return fn(x)
    k = -(-n // chunk)
    xp = jnp.concatenate([x, x[: k * chunk - n]]) if k * chunk > n else x
    out = jax.lax.map(fn, xp.reshape(k, chunk, *x.shape[1:]))
    return out.reshape(k * chunk, *out.shape[2:])[:n]


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

    def sample(self, assets: Assets, genome: jax.Array, x_T: jax.Array) -> jax.Array:
        """Images of one genome from x_T (unclipped x_0)."""
        d = self.space.decode(genome)
        check_bits(d.bits, self.registry, self.candidates)
        # CONVERT once per genome, outside the step scan: every step then reads the
        # frozen int8 kernels (SERVE), bit for bit the fake-quant path's output.
        qmodel = export.freeze(assets.params, self.registry, d.bits, assets.qparams)

        def eps_fn(x, t):
            return export.serve_apply(
                self.model,
                qmodel,
                x,
                t,
                registry=self.registry,
                conv_dtype=self.conv_dtype,
            )

        def run(x):  # eta = 0: the key is unused
            return ddim_sample(jax.random.key(0), eps_fn, x, d.timesteps, assets.sched)

        return map_in_chunks(run, x_T, self.sample_chunk)

    @functools.cached_property
    def jitted_sample(self):
        """`sample`, jitted once per problem (re-scoring reuses it for every genome)."""
        return jax.jit(self.sample)

    def fid(self, assets: Assets, genome: jax.Array, axis=None) -> jax.Array:
        """`axis`: the mesh axis `assets.noise` is split over (inside `shard_map`):
        the features of every part are gathered before the FID."""
        x0 = self.sample(assets, genome, assets.noise)
        finite = jnp.all(jnp.isfinite(x0))
        images = jnp.clip(jnp.where(finite, x0, 0.0), -1.0, 1.0)
        feats = assets.net.features(images)
        if axis is not None:
            feats = jax.lax.all_gather(feats, axis, tiled=True)
            finite = jax.lax.psum((~finite).astype(jnp.int32), axis) == 0
        f = fid_from_features(
            feats,
            assets.mu_ref,
            assets.sigma_ref,
            assets.sqrt_sigma_ref,
        )
        return jnp.where(finite & jnp.isfinite(f), f, WORST_FID)

    def population_fid(self, assets: Assets, genomes: jax.Array, axis=None):
        """float32[P] for int32[P, D], `candidate_chunk` genomes vmapped at a time
        (`axis`: see `fid`)."""
        return jax.lax.map(
            lambda g: self.fid(assets, g, axis),
            genomes,
            batch_size=min(self.candidate_chunk, genomes.shape[0]),
        )
