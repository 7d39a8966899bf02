"""The DiT of `dit.py` in Flax NNX: a small model for the quantizer's NNX tests.

Same architecture and `DiTConfig` (patchify, sin-cos positions, adaLN-Zero blocks,
modulated head), built from stock NNX layers so that every way NNX multiplies
shows up: `nnx.Einsum` (the patch embedding, as one einsum over pixel patches),
`nnx.Linear` (time MLP, adaLN, MLP, head), `nnx.MultiHeadAttention` and
`nnx.Embed` (labels, when `num_classes > 0`). Not trained, not shipped.
The adaLN-Zero layers start random unless `adaln_zero=True` (DiT's training
init, under which an untrained model outputs zeros): a quantizer test wants
every layer to reach the output.

    model = DiTNNX(TINY_NNX_DIT, rngs=nnx.Rngs(0))
    v = model(x, t)          # x [B, H, W, C], t float [B] in [0, 1]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tmpq_jax.errors import UserError
from tmpq_jax.models.dit import DiTConfig, modulate, sincos_pos_embed
from tmpq_jax.models.unet import timestep_embedding

TINY_NNX_DIT = DiTConfig(
    image_size=8,
    channels=1,
    patch=2,
    width=32,
    depth=2,
    heads=2,
    num_classes=0,
    time_embed_dim=32,
)


def _gate_linear(n_in, n_out, rngs: nnx.Rngs, dtype, zero: bool) -> nnx.Linear:
    """adaLN / head layer: zero-initialised (DiT) or random (tests)."""
    init = nnx.initializers.zeros if zero else nnx.initializers.normal(0.02)
    return nnx.Linear(n_in, n_out, kernel_init=init, dtype=dtype, rngs=rngs)


class BlockNNX(nnx.Module):
    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs, adaln_zero: bool):
        w, dt = cfg.width, jnp.dtype(cfg.dtype)
        self.adaln = _gate_linear(w, 6 * w, rngs, dt, adaln_zero)
        self.norm1 = nnx.LayerNorm(
            w, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs
        )
        self.attn = nnx.MultiHeadAttention(
            cfg.heads, w, qkv_features=w, decode=False, dtype=dt, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(
            w, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs
        )
        hidden = int(w * cfg.mlp_ratio)
        self.fc1 = nnx.Linear(w, hidden, dtype=dt, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, w, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.adaln(nnx.silu(c)), 6, axis=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        h = self.fc1(modulate(self.norm2(x), sh2, sc2))
        return x + g2[:, None] * self.fc2(nnx.gelu(h, approximate=True))


class DiTNNX(nnx.Module):
    """v_theta(x_t, t, y) as `dit.DiT`, in NNX (params live in the module)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, adaln_zero: bool = False):
        cfg.validate()
        self.cfg = cfg
        w, p, dt = cfg.width, cfg.patch, jnp.dtype(cfg.dtype)
        # patchify as an einsum over flattened patches: [B, N, p*p*C] x [p*p*C, W]
        self.patch_embed = nnx.Einsum(
            "bnk,kd->bnd", (p * p * cfg.channels, w), (w,), dtype=dt, rngs=rngs
        )
        self.t_embed0 = nnx.Linear(cfg.time_embed_dim, w, dtype=dt, rngs=rngs)
        self.t_embed1 = nnx.Linear(w, w, dtype=dt, rngs=rngs)
        self.y_embed = (
            nnx.Embed(cfg.num_classes + 1, w, rngs=rngs) if cfg.conditional else None
        )
        self.blocks = nnx.List(
            [BlockNNX(cfg, rngs, adaln_zero) for _ in range(cfg.depth)]
        )
        self.final_adaln = _gate_linear(w, 2 * w, rngs, dt, adaln_zero)
        self.final_norm = nnx.LayerNorm(
            w, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs
        )
        self.final_linear = _gate_linear(w, p * p * cfg.channels, rngs, dt, adaln_zero)

    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None
    ) -> jax.Array:
        cfg = self.cfg
        b, hh, ww, ch = x.shape
        if hh != cfg.image_size or ww != cfg.image_size:
            raise UserError(
                f"input {hh}x{ww} but the DiT was built for "
                f"{cfg.image_size}x{cfg.image_size} images."
            )
        p, g = cfg.patch, cfg.image_size // cfg.patch
        patches = x.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5)
        h = self.patch_embed(patches.reshape(b, g * g, p * p * ch))
        h = h + sincos_pos_embed(g, cfg.width)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        temb = timestep_embedding(t * cfg.time_scale, cfg.time_embed_dim)
        c = self.t_embed1(nnx.silu(self.t_embed0(temb)))
        if self.y_embed is not None:
            y = jnp.full((b,), cfg.null_label, jnp.int32) if y is None else y
            c = c + self.y_embed(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = jnp.split(self.final_adaln(nnx.silu(c)), 2, axis=-1)
        h = self.final_linear(modulate(self.final_norm(h), shift, scale))
        h = h.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, hh, ww, ch).astype(jnp.float32)
