"""Models the project never shipped, written with stock Flax only, for the
bring-your-own-model tests; each with an independent count of its MACs."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

SIZE, PATCH, WIDTH, HEADS = 16, 4, 16, 2
TOKENS = (SIZE // PATCH) ** 2
FREQ = 8


def timestep_features(t):
    half = FREQ // 2
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half) / half)
    ang = t.astype(jnp.float32)[:, None] * freqs
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


class LinenDiT(nn.Module):
    """A DiT block with adaLN and stock `nn.MultiHeadDotProductAttention`,
    the attention module named `mixer` (nothing says 'av' or 'softmax')."""

    @nn.compact
    def __call__(self, x, t):
        b = x.shape[0]
        h = nn.Conv(WIDTH, (PATCH, PATCH), strides=PATCH, name="patch")(x)
        h = h.reshape(b, TOKENS, WIDTH)
        c = nn.Dense(WIDTH, name="temb")(timestep_features(t))
        shift, scale = jnp.split(nn.Dense(2 * WIDTH, name="ada")(nn.silu(c)), 2, -1)
        y = nn.LayerNorm(use_scale=False, use_bias=False)(h)
        y = y * (1 + scale[:, None]) + shift[:, None]
        h = h + nn.MultiHeadDotProductAttention(HEADS, name="mixer")(y)
        y = nn.LayerNorm()(h)
        h = h + nn.Dense(WIDTH, name="fc2")(nn.gelu(nn.Dense(4 * WIDTH, name="fc1")(y)))
        out = nn.Dense(PATCH * PATCH, name="head")(h)
        g = SIZE // PATCH
        out = out.reshape(b, g, g, PATCH, PATCH).transpose(0, 1, 3, 2, 4)
        return out.reshape(b, SIZE, SIZE, 1)


def linen_dit_macs() -> float:
    d, n = WIDTH, TOKENS
    return (
        n * PATCH * PATCH * d  # patch
        + FREQ * d  # temb
        + d * 2 * d  # ada
        + 4 * n * d * d  # q, k, v, out
        + 2 * n * n * d  # q.k and p.v over all heads
        + 2 * n * d * 4 * d  # mlp
        + n * d * PATCH * PATCH  # head
    )


class EinsumNet(nn.Module):
    """Bare `jnp.einsum`, `@`, `nn.Einsum`, `nn.DenseGeneral`, `nn.ConvTranspose`
    and a hand-written softmax, inside one module."""

    @nn.compact
    def __call__(self, x, t):
        b = x.shape[0]
        rows = x.reshape(b, SIZE, SIZE)
        w = self.param("w", nn.initializers.lecun_normal(), (WIDTH, SIZE))
        h = jnp.einsum("of,btf->bto", w, rows)  # the weight is the left operand
        h = h + nn.Dense(WIDTH, name="temb")(timestep_features(t))[:, None]
        g = nn.Einsum((WIDTH, WIDTH), "btd,de->bte", name="mix")(h)
        logits = jnp.einsum("bte,bse->bts", g, h)
        e = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
        attn = e / jnp.sum(e, -1, keepdims=True)
        o = attn @ g
        o = nn.DenseGeneral(SIZE, name="out")(o)
        return nn.ConvTranspose(1, (3, 3), name="up")(o[..., None])


def einsum_net_macs() -> float:
    d, n = WIDTH, SIZE
    return (
        n * SIZE * d  # w
        + FREQ * d  # temb
        + n * d * d  # mix
        + 2 * n * n * d  # logits, attn @ g
        + n * d * SIZE  # out
        + SIZE * SIZE * 9  # up (1 -> 1 channel, 3x3, stride 1)
    )


class NNXDiT(nnx.Module):
    """An NNX DiT block: nnx.Linear patches, nnx.MultiHeadAttention, nnx.Einsum."""

    def __init__(self, rngs: nnx.Rngs):
        self.patch = nnx.Linear(PATCH * PATCH, WIDTH, rngs=rngs)
        self.temb = nnx.Linear(FREQ, WIDTH, rngs=rngs)
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
        self.mlp = nnx.Einsum("btd,de->bte", (WIDTH, 4 * WIDTH), rngs=rngs)
        self.proj = nnx.Linear(4 * WIDTH, WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, PATCH * PATCH, rngs=rngs)

    def __call__(self, x, t):
        b, g = x.shape[0], SIZE // PATCH
        p = x.reshape(b, g, PATCH, g, PATCH).transpose(0, 1, 3, 2, 4)
        h = self.patch(p.reshape(b, TOKENS, PATCH * PATCH))
        h = h + self.temb(timestep_features(t))[:, None]
        h = h + self.attn(self.norm(h))
        h = h + self.proj(nnx.gelu(self.mlp(h)))
        out = self.head(h).reshape(b, g, g, PATCH, PATCH).transpose(0, 1, 3, 2, 4)
        return out.reshape(b, SIZE, SIZE, 1)


def nnx_dit_macs() -> float:
    d, n = WIDTH, TOKENS
    return (
        n * PATCH * PATCH * d
        + FREQ * d
        + 4 * n * d * d
        + 2 * n * n * d
        + 2 * n * d * 4 * d
        + n * d * PATCH * PATCH
    )


def inputs(batch: int = 2):
    x = jax.random.normal(jax.random.key(7), (batch, SIZE, SIZE, 1))
    t = jnp.arange(batch, dtype=jnp.int32) * 400 + 5
    return x, t
