"""GroupNorm + SiLU + AQT per-tensor activation quantizer in one Pallas kernel.

Before each quantized conv the UNet computes `quant(silu(GroupNorm(x)))`, where x
(float32, or the up path's (h, skip) parts) is only read. XLA runs that as two
kernels: a reduction reading x for the group statistics (4 B per element), then a
fused normalize + SiLU + quantizer reading x again and writing the conv's int8
input (4 + 1 B): 9 B per element from HBM. `fused` is one kernel, one program per
sample: it reads the sample once for the statistics and once more to normalize
(a sample is at most a few hundred KiB, so the second read should mostly hit L2;
loads are hinted evict_last, then evict_first), writing int8: 5 B per element.
`reference` is the same function in plain JAX (the model's own modules): XLA's
two passes. Measured prototypes (`python -m benchmarks.experiments.kernel_breakdown --only
gnq_...`), not used by the model: on an H100 neither `fused` nor `fused_blocks` (one
program per sample and block of whole groups) beats XLA at 28x28, where the bytes
are (336 us at best against XLA's 340, one elementwise pass 161); they win at 14x14
and 7x7 (benchmarks/results/kernel_breakdown_gnq.json). `reference` is meant to be
exact against the model's path: the test bed a faster kernel would be checked on
(no test in tests/ covers these experiments).

Numerics: statistics as `models.norm.GroupNorm` (float32 E[x^2] - E[x]^2 clipped at
0, eps 1e-6; only the summation order differs), SiLU as `nn.silu`, quantizer as AQT's
with `numerics.PerTensorCalibration(bound)` and `TracedIntSymmetric(bits)`: scale =
bound / (2**(bits-1) - 0.5) (bound 0 -> 1), q = x * reciprocal(scale), clipped to
+-(2**(bits-1) - 1), rounded half to even (in the kernel from floor and compares:
Pallas-Triton has no round), int8. Pallas-Triton needs power-of-2 array sizes: rows
(H*W) and channels are loaded in power-of-2 blocks under masks.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tmpq_jax.models.norm import GroupNorm, as_parts
from tmpq_jax.quant.numerics import int_numerics_for

EPS = 1e-6


def quant_params(bound, bits) -> tuple[jax.Array, jax.Array]:
    """(1 / scale, clip bound) of AQT's per-tensor quantizer, as float32 scalars,
    computed with AQT's own operations (aqt_tensor.QTensor.quant)."""
    numerics = int_numerics_for(bits)
    bound = jnp.asarray(bound, jnp.float32)
    bound = jnp.where(bound == 0.0, jnp.ones_like(bound), bound)
    scale = (bound / numerics.get_quant_bound()).astype(jnp.float32)
    inv = lax.reciprocal(scale)
    inv = jnp.where(jnp.isinf(inv), jnp.ones_like(inv), inv)
    clip = jnp.asarray(numerics.get_quant_bound() - 0.5, jnp.float32)
    return inv, clip


def reference(parts, scale, bias, num_groups: int, bound, bits) -> jax.Array:
    """int8[N, H, W, C]: AQT's quantized value of silu(GroupNorm(concat(parts)))."""
    params = {"params": {"scale": scale, "bias": bias}}
    y = nn.silu(GroupNorm(num_groups, epsilon=EPS).apply(params, as_parts(parts)))
    inv, clip = quant_params(bound, bits)
    q = lax.round(jnp.clip(y * inv, -clip, clip), lax.RoundingMethod.TO_NEAREST_EVEN)
    return q.astype(jnp.int8)


def round_half_even(v: jax.Array) -> jax.Array:
    """lax.round(v, TO_NEAREST_EVEN) from floor and compares, all exact (Triton
    has no round; the add-subtract of 1.5 * 2**23 is folded away by XLA's CPU
    simplifier, so interpret mode would truncate instead)."""
    t = jnp.floor(v)
    d = v - t
    odd = (t - 2.0 * jnp.floor(0.5 * t)) == 1.0
    return jnp.where((d > 0.5) | ((d == 0.5) & odd), t + 1.0, t)


def _block_at(ref, n, r0, rows, c0, cbp, cb, hw):
    """(indexed ref, mask) of a [rows, cbp] tile at row r0, channel c0 of sample n:
    rows below hw and channels below c0 + cb (cbp is cb rounded up to 2**k)."""
    r = r0 + jnp.arange(rows)
    mask = (r < hw)[:, None] & (jnp.arange(cbp) < cb)[None, :]
    return ref.at[n, pl.ds(r0, rows), pl.ds(c0, cbp)], mask


def _channel_sums(xs, n, layout, rows, hw):
    """Pass 1: per part, ([cp] sums of x, [cp] sums of x**2) over the sample's rows
    (accumulated as [rows, cp] tiles, reduced over rows at the end)."""

    def body(i, acc):
        out = []
        for x_ref, (w, cp, _), (s, q) in zip(xs, layout, acc, strict=True):
            ref, mask = _block_at(x_ref, n, i * rows, rows, 0, cp, w, hw)
            x = plgpu.load(ref, mask=mask, other=0.0, eviction_policy="evict_last")
            out.append((s + x, q + x * x))
        return tuple(out)

    zero = lambda cp: jnp.zeros((rows, cp), jnp.float32)
    acc = tuple((zero(cp), zero(cp)) for _, cp, _ in layout)
    acc = lax.fori_loop(0, pl.cdiv(hw, rows), body, acc)
    return [(jnp.sum(s, axis=0), jnp.sum(q, axis=0)) for s, q in acc]


def _one_hot(width, cp, offset, per_group, gp):
    """float32 [cp, gp]: 1 where the part's channel c (< width) is in group g."""
    c = jnp.arange(cp)
    g = lax.div(c + offset, per_group)
    hot = (g[:, None] == jnp.arange(gp)[None, :]) & (c < width)[:, None]
    return hot.astype(jnp.float32)


def _kernel(*refs, layout, groups, rows, hw):
    """One sample: group statistics, then normalize + SiLU + quantize each part.
    `layout`: per part (channels, channels rounded up to 2**k, channel offset)."""
    k = len(layout)
    xs, scales, biases = refs[:k], refs[k : 2 * k], refs[2 * k : 3 * k]
    inv_ref, clip_ref, out_ref = refs[3 * k :]
    n = pl.program_id(0)
    sums = _channel_sums(xs, n, layout, rows, hw)
    per_group = sum(w for w, _, _ in layout) // groups
    gp = pl.next_power_of_2(groups)
    hots = [_one_hot(w, cp, off, per_group, gp) for w, cp, off in layout]
    gsum = sum(
        jnp.sum(s[:, None] * h, axis=0) for (s, _), h in zip(sums, hots, strict=True)
    )
    gsq = sum(
        jnp.sum(q[:, None] * h, axis=0) for (_, q), h in zip(sums, hots, strict=True)
    )
    count = float(hw * per_group)
    mean, mean2 = gsum / count, gsq / count  # as models.norm.GroupNorm
    rstd = lax.rsqrt(jnp.maximum(0.0, mean2 - mean * mean) + EPS)
    inv, clip = inv_ref[...], clip_ref[...]
    for p, (w, cp, off) in enumerate(layout):
        cmask = jnp.arange(cp) < w
        scale = plgpu.load(scales[p].at[pl.ds(0, cp)], mask=cmask, other=0.0)
        bias = plgpu.load(biases[p].at[pl.ds(0, cp)], mask=cmask, other=0.0)
        m = jnp.sum(hots[p] * mean[None, :], axis=1)  # each channel's group mean
        mul = jnp.sum(hots[p] * rstd[None, :], axis=1) * scale
        coef = (m, mul, bias, inv, clip)
        _normalize(xs[p], out_ref, n, coef, rows, (w, cp, off), hw)


def _quantized(x, coef):
    """int8 of quant(silu((x - m) * mul + b)) for a [rows, channels] tile."""
    m, mul, b, inv, clip = coef
    y = jax.nn.silu((x - m[None, :]) * mul[None, :] + b[None, :])
    v = jnp.minimum(jnp.maximum(y * inv, -clip), clip)
    return round_half_even(v).astype(jnp.int8)


def _normalize(x_ref, out_ref, n, coef, rows, part, hw):
    """Pass 2 over one part: int8 of quant(silu((x - m) * mul + b))."""
    width, cp, offset = part

    @pl.loop(0, pl.cdiv(hw, rows))
    def _(i):
        ref, mask = _block_at(x_ref, n, i * rows, rows, 0, cp, width, hw)
        x = plgpu.load(ref, mask=mask, other=0.0, eviction_policy="evict_first")
        dst = out_ref.at[n, pl.ds(i * rows, rows), pl.ds(offset, cp)]
        plgpu.store(dst, _quantized(x, coef), mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=("num_groups", "interpret", "block", "num_warps", "num_stages"),
)
def fused(
    parts,
    scale,
    bias,
    num_groups: int,
    bound,
    bits,
    *,
    interpret: bool = False,
    block: int = 2048,
    num_warps: int = 4,
    num_stages: int = 1,
) -> jax.Array:
    """`reference` as one Pallas kernel, one program per sample; 1 or more parts
    [N, H, W, C_i] float32 are read in place (never concatenated). `block`: elements
    of a [rows, channels] tile (rows a power of 2, all parts' channels together);
    `num_warps`, `num_stages`: Triton's (stages > 1 pipelines the row loops' loads)."""
    parts = tuple(p.astype(jnp.float32) for p in as_parts(parts))
    widths = tuple(p.shape[-1] for p in parts)
    if sum(widths) % num_groups:
        raise ValueError(f"{sum(widths)} channels not divisible by {num_groups}")
    hw = math.prod(parts[0].shape[1:3])
    starts = (0, *itertools.accumulate(widths))
    layout = tuple(
        (c, pl.next_power_of_2(c), o) for c, o in zip(widths, starts, strict=False)
    )
    rows = _tile_rows(hw, block, sum(cp for _, cp, _ in layout))
    kernel = functools.partial(
        _kernel, layout=layout, groups=num_groups, rows=rows, hw=hw
    )
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    grid = (parts[0].shape[0],)
    return _call(kernel, grid, params, interpret, parts, scale, bias, bound, bits)


def _tile_rows(hw: int, block: int, channels: int) -> int:
    """Rows of a [rows, channels] tile of about `block` elements: a power of 2, no
    more than the sample's rows rounded up to one."""
    return min(pl.next_power_of_2(hw), 1 << int(math.log2(max(1, block // channels))))


def _call(kernel, grid, params, interpret, parts, scale, bias, bound, bits):
    """The pallas_call both kernels share: parts as [N, H*W, C_i] with their slices
    of scale and bias, the quantizer's (1/scale, clip); int8 [N, H, W, C] out."""
    n, h, w = parts[0].shape[:3]
    widths = tuple(p.shape[-1] for p in parts)
    cuts = tuple(itertools.accumulate(widths))[:-1]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, h * w, sum(widths)), jnp.int8),
        grid=grid,
        compiler_params=params,
        interpret=interpret,
        name=f"gn_silu_quant{kernel.func.__name__}",
    )(
        *(p.reshape(n, h * w, -1) for p in parts),
        *jnp.split(scale.astype(jnp.float32), cuts),
        *jnp.split(bias.astype(jnp.float32), cuts),
        *quant_params(bound, bits),
    )
    return out.reshape(n, h, w, sum(widths))


# ----------------------------------------------------------------------------
# One program per (sample, block of whole groups): a smaller working set per
# program (the block's channels only), so its second read can hit L1/L2.


def _block_kernel(*refs, blocks, per_group, gpb, rows, hw):
    """Program (n, j): groups [j*gpb, (j+1)*gpb) of sample n, all inside one part.
    `blocks`: per part (first block index, number of blocks, channel offset)."""
    k = len(blocks)
    xs, scales, biases = refs[:k], refs[k : 2 * k], refs[2 * k : 3 * k]
    inv_ref, clip_ref, out_ref = refs[3 * k :]
    n, j = pl.program_id(0), pl.program_id(1)
    cb = gpb * per_group
    cbp, gpp = pl.next_power_of_2(cb), pl.next_power_of_2(gpb)
    hot = _one_hot(cb, cbp, 0, per_group, gpp)
    for p, (first, count, offset) in enumerate(blocks):

        @pl.when((j >= first) & (j < first + count))
        def _(p=p, first=first, offset=offset):
            c0 = (j - first) * cb
            cmask = jnp.arange(cbp) < cb
            scale = plgpu.load(scales[p].at[pl.ds(c0, cbp)], mask=cmask, other=0.0)
            bias = plgpu.load(biases[p].at[pl.ds(c0, cbp)], mask=cmask, other=0.0)
            consts = (scale, bias, inv_ref[...], clip_ref[...])
            if rows >= hw:  # the block in one tile: read once, kept in registers
                ref, mask = _block_at(xs[p], n, 0, rows, c0, cbp, cb, hw)
                x = plgpu.load(ref, mask=mask, other=0.0)
                sums = (jnp.sum(x, axis=0), jnp.sum(x * x, axis=0))
                coef = _coef(*_moments(*sums, hot, hw, per_group), *consts)
                dst = out_ref.at[n, pl.ds(0, rows), pl.ds(offset + c0, cbp)]
                plgpu.store(dst, _quantized(x, coef), mask=mask)
                return
            moments = _block_stats(xs[p], n, c0, cbp, cb, hot, rows, hw, per_group)
            coef = _coef(*moments, *consts)
            _block_normalize(xs[p], out_ref, n, c0, offset, coef, rows, cbp, cb, hw)


def _coef(m, rstd, scale, bias, inv, clip):
    return m, rstd * scale, bias, inv, clip


def _moments(s, q, hot, hw, per_group):
    """Each channel's group mean and rstd ([cbp] each) from its channel sums of x
    and x**2 over the sample ([cbp] each); `hot`: channel -> group one-hot."""
    count = float(hw * per_group)
    mean = jnp.sum(s[:, None] * hot, axis=0) / count
    mean2 = jnp.sum(q[:, None] * hot, axis=0) / count
    rstd = lax.rsqrt(jnp.maximum(0.0, mean2 - mean * mean) + EPS)
    return jnp.sum(hot * mean[None, :], axis=1), jnp.sum(hot * rstd[None, :], axis=1)


def _block_stats(x_ref, n, c0, cbp, cb, hot, rows, hw, per_group):
    """Each channel's group mean and rstd ([cbp] each) over the sample's rows."""

    def body(i, acc):
        s, q = acc
        ref, mask = _block_at(x_ref, n, i * rows, rows, c0, cbp, cb, hw)
        x = plgpu.load(ref, mask=mask, other=0.0, eviction_policy="evict_last")
        return s + x, q + x * x

    zero = jnp.zeros((rows, cbp), jnp.float32)
    s, q = lax.fori_loop(0, pl.cdiv(hw, rows), body, (zero, zero))
    return _moments(jnp.sum(s, axis=0), jnp.sum(q, axis=0), hot, hw, per_group)


def _block_normalize(x_ref, out_ref, n, c0, offset, coef, rows, cbp, cb, hw):

    @pl.loop(0, pl.cdiv(hw, rows))
    def _(i):
        ref, mask = _block_at(x_ref, n, i * rows, rows, c0, cbp, cb, hw)
        x = plgpu.load(ref, mask=mask, other=0.0, eviction_policy="evict_first")
        dst = out_ref.at[n, pl.ds(i * rows, rows), pl.ds(offset + c0, cbp)]
        plgpu.store(dst, _quantized(x, coef), mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=("num_groups", "gpb", "interpret", "block", "num_warps"),
)
def fused_blocks(
    parts,
    scale,
    bias,
    num_groups: int,
    bound,
    bits,
    *,
    gpb: int = 2,
    interpret: bool = False,
    block: int = 2048,
    num_warps: int = 4,
) -> jax.Array:
    """`fused` with one program per (sample, `gpb` groups): each part's channel
    count must be a multiple of `gpb` groups' channels (so no block straddles).
    A `block` (tile elements) that holds a program's whole block of the sample
    reads it from HBM once and keeps it in registers between the two passes."""
    parts = tuple(p.astype(jnp.float32) for p in as_parts(parts))
    widths = tuple(p.shape[-1] for p in parts)
    per_group, hw = sum(widths) // num_groups, math.prod(parts[0].shape[1:3])
    cb = gpb * per_group
    if sum(widths) % num_groups or any(c % cb for c in widths):
        raise ValueError(f"parts {widths}: not whole blocks of {gpb} groups")
    starts = (0, *itertools.accumulate(widths))
    firsts = (0, *itertools.accumulate(c // cb for c in widths))
    blocks = tuple(
        (f, c // cb, o) for f, c, o in zip(firsts, widths, starts, strict=False)
    )
    rows = _tile_rows(hw, block, pl.next_power_of_2(cb))
    kernel = functools.partial(
        _block_kernel, blocks=blocks, per_group=per_group, gpb=gpb, rows=rows, hw=hw
    )
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    grid = (parts[0].shape[0], firsts[-1])
    return _call(kernel, grid, params, interpret, parts, scale, bias, bound, bits)
