"""A class-conditional DiT (Peebles & Xie 2023, arXiv 2212.09748) in Flax linen.

Patchify by a stride-p conv, fixed 2D sin-cos position embedding, `depth` blocks
of adaLN-Zero (stock `nn.MultiHeadDotProductAttention` + a GELU MLP), an
adaLN-modulated linear head and unpatchify. Conditioning c = time embedding +
label embedding; the label table has one extra row, the null class
(index `num_classes`), which classifier-free guidance uses for the unconditional
branch (training drops labels to it, `diffusion/flow.py`). `num_classes=0` builds
an unconditional model (no label table).

Time is continuous, t in [0, 1] (t = 1 is noise); it is scaled by `time_scale`
before the sinusoid so its frequencies see the same range as integer timesteps.
The model predicts the flow velocity (`prediction = "velocity"`). Only plain
`nn.Conv` / `nn.Dense` / stock attention multiply, so the quantizer's interceptor
sees every matmul. Submodules have explicit names (`block_3/attn`, `final/linear`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError, check_keys
from tmpq_jax.models.unet import timestep_embedding

PREDICTIONS = ("velocity",)  # what a DiT can be trained for today (diffusion/flow.py)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    image_size: int = 28
    channels: int = 1
    patch: int = 2
    width: int = 192
    depth: int = 6
    heads: int = 6
    num_classes: int = 10  # 0: unconditional; the null class is index num_classes
    mlp_ratio: float = 4.0
    time_embed_dim: int = 256  # sinusoid size before the time MLP
    time_scale: float = 1000.0  # t in [0, 1] -> t * time_scale before the sinusoid
    prediction: str = "velocity"  # what the output is: see diffusion/flow.py
    dtype: str = "float32"  # compute dtype; params stay float32

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiTConfig:
        check_keys(cls, d, "the DiT config")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def validate(self) -> None:
        if self.patch < 1 or self.image_size % self.patch:
            raise UserError(
                f"image size {self.image_size} is not divisible by patch {self.patch}; "
                "use a patch size that divides it."
            )
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise UserError(
                f"width {self.width} must split into {self.heads} heads of even size."
            )
        if self.width % 4:
            raise UserError(
                f"width {self.width}: use a multiple of 4 (2D sin-cos positions)."
            )
        if self.depth < 1 or self.num_classes < 0:
            raise UserError("depth must be >= 1 and num_classes >= 0.")
        if self.prediction not in PREDICTIONS:
            raise UserError(
                f"prediction {self.prediction!r}: a DiT predicts one of {PREDICTIONS}."
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype {self.dtype!r}: use 'float32' or 'bfloat16'.")


def sincos_pos_embed(grid: int, dim: int) -> np.ndarray:
    """Fixed 2D sin-cos embedding [grid*grid, dim] (MAE / DiT): half rows, half cols."""

    def one_axis(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = np.concatenate([one_axis(gy, dim // 2), one_axis(gx, dim // 2)], axis=1)
    return emb.astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale[:, None]) + shift[:, None]


_dense_init = nn.initializers.xavier_uniform()


class DiTBlock(nn.Module):
    """adaLN-Zero: the conditioning regresses shift/scale/gate; gates start at 0,
    so every block starts as the identity."""

    width: int
    heads: int
    mlp_ratio: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        dt = self.dtype
        mod = nn.Dense(
            6 * self.width, dtype=dt, kernel_init=nn.initializers.zeros, name="adaln"
        )(nn.silu(c))
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
        ln = lambda name: nn.LayerNorm(
            epsilon=1e-6, dtype=dt, use_bias=False, use_scale=False, name=name
        )
        h = modulate(ln("norm1")(x), sh1, sc1)
        h = nn.MultiHeadDotProductAttention(
            self.heads,
            dtype=dt,
            qkv_features=self.width,
            kernel_init=_dense_init,
            deterministic=True,
            name="attn",
        )(h)
        x = x + g1[:, None] * h
        h = modulate(ln("norm2")(x), sh2, sc2)
        h = nn.Dense(
            int(self.width * self.mlp_ratio),
            dtype=dt,
            kernel_init=_dense_init,
            name="fc1",
        )(h)
        h = nn.Dense(self.width, dtype=dt, kernel_init=_dense_init, name="fc2")(
            nn.gelu(h, approximate=True)
        )
        return x + g2[:, None] * h


class DiT(nn.Module):
    """v_theta(x_t, t, y). `x`: [B, H, W, C]; `t`: [B] (or scalar) float in [0, 1];
    `y`: int [B] labels in [0, num_classes), or None for the null class."""

    config: DiTConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None
    ) -> jax.Array:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        b, hh, ww, ch = x.shape
        if hh != cfg.image_size or ww != cfg.image_size:
            raise UserError(
                f"input {hh}x{ww} but the DiT was built for "
                f"{cfg.image_size}x{cfg.image_size} images."
            )
        p, g = cfg.patch, cfg.image_size // cfg.patch

        h = nn.Conv(
            cfg.width,
            (p, p),
            strides=(p, p),
            dtype=dt,
            kernel_init=_dense_init,
            name="patch_embed",
        )(x.astype(dt))
        h = h.reshape(b, g * g, cfg.width) + sincos_pos_embed(g, cfg.width).astype(dt)

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        temb = timestep_embedding(t * cfg.time_scale, cfg.time_embed_dim)
        init = nn.initializers.normal(0.02)
        c = nn.Dense(cfg.width, dtype=dt, kernel_init=init, name="t_embed0")(temb)
        c = nn.Dense(cfg.width, dtype=dt, kernel_init=init, name="t_embed1")(nn.silu(c))
        if y is not None and not cfg.conditional:
            raise UserError(
                "labels given to an unconditional DiT (num_classes=0); leave them out."
            )
        if cfg.conditional:
            y = jnp.full((b,), cfg.null_label, jnp.int32) if y is None else y
            table = nn.Embed(
                cfg.num_classes + 1, cfg.width, embedding_init=init, name="y_embed"
            )
            c = c + table(jnp.broadcast_to(y, (b,))).astype(c.dtype)

        for i in range(cfg.depth):
            h = DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio, dt, name=f"block_{i}")(
                h, c
            )

        shift, scale = jnp.split(
            nn.Dense(
                2 * cfg.width,
                dtype=dt,
                kernel_init=nn.initializers.zeros,
                name="final_adaln",
            )(nn.silu(c)),
            2,
            axis=-1,
        )
        h = nn.LayerNorm(
            epsilon=1e-6, dtype=dt, use_bias=False, use_scale=False, name="final_norm"
        )(h)
        h = nn.Dense(
            p * p * ch, dtype=dt, kernel_init=nn.initializers.zeros, name="final_linear"
        )(modulate(h, shift, scale))
        # unpatchify: [B, g*g, p*p*C] -> [B, g*p, g*p, C]
        h = h.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, hh, ww, ch).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)  # compiled once per config
def init_params(config: DiTConfig, key: jax.Array) -> dict:
    """Params of a DiT for `config`, built under jit (fast init on CPU)."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.channels))
    t, y = jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    return DiT(config).init(key, x, t, y)["params"]


def gflops_per_image(config: DiTConfig, batch: int = 8) -> float:
    """Forward GFLOP per image, from XLA's cost analysis of the compiled forward."""
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    x = jax.ShapeDtypeStruct(
        (batch, config.image_size, config.image_size, config.channels), jnp.float32
    )
    t, y = (
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    fwd = jax.jit(lambda p, x, t, y: DiT(config).apply({"params": p}, x, t, y))
    cost = fwd.lower(params, x, t, y).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / batch / 1e9


def load_dit(path: str | Path) -> tuple[DiTConfig, dict, dict]:
    """An exported DiT (`tmpq_jax.train` of a flow config): (config, params, card)."""
    from tmpq_jax.checkpoint import load_params, read_card

    card = read_card(path)
    try:
        if "flow" not in card["config"]:
            raise KeyError("flow")
        cfg = DiTConfig.from_dict(card["config"]["model"])
    except (KeyError, TypeError) as e:
        raise UserError(
            f"{path}/card.json: not an exported DiT (missing {e}); train one with a "
            "flow config such as configs/fmnist_dit.py."
        ) from None
    like = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return cfg, load_params(path, like), card
