"""A DDPM-style UNet (Ho et al. 2020, arXiv 2006.11239) in Flax linen, sized for 28x28.

Sinusoidal time embedding, residual blocks with GroupNorm + SiLU, self-attention at
chosen resolutions, stride-2 conv downsampling and nearest + conv upsampling. Skip
connections reach the up path's residual blocks as (h, skip) parts rather than a
concatenation (`models/norm.py` says why). All
matmuls go through `ops.Conv`, `ops.Dense` and `ops.MatMul` (the injection point).
The model predicts epsilon. Submodules have explicit names so that layer paths
(`down_0_res_1/conv1`, `mid_attn/qk`, ...) are stable and readable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tmpq_jax.errors import UserError, check_keys
from tmpq_jax.models import norm
from tmpq_jax.models.norm import GroupNorm
from tmpq_jax.models.ops import Conv, Dense, MatMul


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    image_size: int = 28
    channels: int = 1
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 1
    num_groups: int = 8
    dtype: str = "float32"  # compute dtype; params stay float32

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        check_keys(cls, d, "the model config")
        d = dict(d)
        for k in ("ch_mult", "attn_resolutions"):
            if k in d:
                d[k] = tuple(int(v) for v in d[k])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def validate(self) -> None:
        levels = len(self.ch_mult)
        if self.image_size % 2 ** (levels - 1):
            raise UserError(
                f"image size {self.image_size} is not divisible by {2 ** (levels - 1)} "
                f"({levels} UNet levels); use a size that is, or fewer ch_mult levels."
            )
        bad = set(self.attn_resolutions) - set(self.resolutions)
        if bad:
            raise UserError(
                f"attn_resolutions {sorted(bad)} not among the UNet's resolutions "
                f"{list(self.resolutions)}."
            )
        for m in self.ch_mult:
            if (self.ch * m) % self.num_groups:
                raise UserError(
                    f"channels {self.ch * m} not divisible by num_groups {self.num_groups}."
                )
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype {self.dtype!r}: use 'float32' or 'bfloat16'.")


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10_000.0
) -> jax.Array:
    """Sinusoidal embedding of (possibly traced, float or int) timesteps: [B] -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResBlock(nn.Module):
    out_ch: int
    num_groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: norm.Parts, temb: jax.Array) -> jax.Array:
        """`x`: an array, or the (h, skip) parts of the up path's concatenation."""
        h = nn.silu(GroupNorm(self.num_groups, dtype=self.dtype, name="norm0")(x))
        h = Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv0")(h)
        h = (
            h
            + Dense(self.out_ch, dtype=self.dtype, name="temb")(nn.silu(temb))[
                :, None, None
            ]
        )
        h = nn.silu(GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(h))
        h = Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv1")(h)
        x = norm.concat(x)  # parts: fused by XLA into what reads it
        if x.shape[-1] != self.out_ch:
            x = Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttnBlock(nn.Module):
    num_heads: int
    num_groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        nh, hd = self.num_heads, c // self.num_heads
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        qkv = Dense(3 * c, dtype=self.dtype, name="qkv")(h.reshape(b, hh * ww, c))
        q, k, v = jnp.split(qkv.reshape(b, hh * ww, 3, nh, hd), 3, axis=2)
        q, k, v = (a[:, :, 0] for a in (q, k, v))  # [B, L, nh, hd]
        logits = MatMul("blhd,bmhd->bhlm", dtype=self.dtype, name="qk")(
            q, k
        ) / math.sqrt(hd)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
        out = MatMul("bhlm,bmhd->blhd", dtype=self.dtype, name="av")(attn, v)
        out = Dense(c, dtype=self.dtype, name="proj")(out.reshape(b, hh * ww, c))
        return x + out.reshape(b, hh, ww, c)


class UNet(nn.Module):
    """eps_theta(x_t, t). `x`: [B, H, W, C] in model range; `t`: [B] timesteps."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        if x.shape[1] != cfg.image_size or x.shape[2] != cfg.image_size:
            raise UserError(
                f"input {x.shape[1]}x{x.shape[2]} but the model was built for "
                f"{cfg.image_size}x{cfg.image_size} images."
            )
        res_block = lambda c, name: ResBlock(c, cfg.num_groups, dt, name=name)
        attn_block = lambda name: AttnBlock(
            cfg.num_heads, cfg.num_groups, dt, name=name
        )

        temb = timestep_embedding(jnp.broadcast_to(t, x.shape[:1]), cfg.ch)
        temb = Dense(4 * cfg.ch, dtype=dt, name="temb0")(temb)
        temb = Dense(4 * cfg.ch, dtype=dt, name="temb1")(nn.silu(temb))

        h = Conv(cfg.ch, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))
        skips = [h]
        for i, mult in enumerate(cfg.ch_mult):
            for j in range(cfg.num_res_blocks):
                h = res_block(cfg.ch * mult, f"down_{i}_res_{j}")(h, temb)
                if h.shape[1] in cfg.attn_resolutions:
                    h = attn_block(f"down_{i}_attn_{j}")(h)
                skips.append(h)
            if i < len(cfg.ch_mult) - 1:
                h = Conv(
                    h.shape[-1],
                    (3, 3),
                    strides=(2, 2),
                    dtype=dt,
                    name=f"down_{i}_downsample",
                )(h)
                skips.append(h)

        h = res_block(h.shape[-1], "mid_res_0")(h, temb)
        h = attn_block("mid_attn")(h)
        h = res_block(h.shape[-1], "mid_res_1")(h, temb)

        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            for j in range(cfg.num_res_blocks + 1):
                # the parts, not their concatenation: see models/norm.py
                h = res_block(cfg.ch * mult, f"up_{i}_res_{j}")((h, skips.pop()), temb)
                if h.shape[1] in cfg.attn_resolutions:
                    h = attn_block(f"up_{i}_attn_{j}")(h)
            if i > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                h = Conv(c, (3, 3), dtype=dt, name=f"up_{i}_upsample")(h)

        h = nn.silu(GroupNorm(cfg.num_groups, dtype=dt, name="norm_out")(h))
        h = Conv(cfg.channels, (3, 3), dtype=dt, name="conv_out")(h)
        return h.astype(jnp.float32)


def init_params(config: UNetConfig, key: jax.Array) -> dict:
    """Params of a UNet for `config`, built under jit (fast init on CPU)."""
    model = UNet(config)
    x = jnp.zeros((1, config.image_size, config.image_size, config.channels))
    t = jnp.zeros((1,), jnp.int32)
    return jax.jit(model.init)(key, x, t)["params"]


def count_params(params: Any) -> int:
    return int(sum(p.size for p in jax.tree.leaves(params)))


def check_channels(x_shape: Sequence[int], config: UNetConfig) -> None:
    if x_shape[-1] != config.channels:
        raise UserError(
            f"images have {x_shape[-1]} channels but the model takes {config.channels}; "
            "set --config.model.channels to match the data."
        )
