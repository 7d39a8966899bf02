"""The `gnq_*` programs `benchmarks/experiments/kernel_breakdown.py` times: GroupNorm + SiLU + the
conv's int8 activation quantizer on a skip concatenation's two parts, as XLA's
passes (`fused_norm_quant.reference`), the fused Pallas kernels (`fused`,
`fused_blocks`, with knob variants swept by name) and the floor (one elementwise
pass); and how far a kernel's int8 values are from XLA's."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from benchmarks.experiments.fused_norm_quant import fused, fused_blocks, reference
from tmpq_jax.models.norm import concat

GNQ_GROUPS, GNQ_BOUND, GNQ_BITS = 8, 3.0, 8  # the UNet's groups; an 8-bit quantizer


GNQ_VARIANTS = (  # name pattern -> (kernel, its knobs), swept by name
    (
        re.compile(r"gnq_(\d+)_pallas_b(\d+)_w(\d+)_s(\d+)$"),
        fused,
        ("block", "num_warps", "num_stages"),
    ),
    (
        re.compile(r"gnq_(\d+)_blocks_g(\d+)_b(\d+)_w(\d+)$"),
        fused_blocks,
        ("gpb", "block", "num_warps"),
    ),
)


def variants(only: set | None, res: int) -> dict:
    """{name: (kernel, knobs)} of the variant names in `only` at `res`:
    `gnq_<res>_pallas_b<block>_w<warps>_s<stages>` (`fused`: one program a sample)
    and `gnq_<res>_blocks_g<groups>_b<block>_w<warps>` (`fused_blocks`: one
    program per sample and block of that many groups)."""
    out = {}
    for name in only or ():
        for pattern, kernel, keys in GNQ_VARIANTS:
            if (m := pattern.match(name)) and int(m[1]) == res:
                out[name] = (
                    kernel,
                    dict(zip(keys, map(int, m.groups()[1:]), strict=True)),
                )
    return out


def programs(samples: int, shapes, only: set | None = None) -> dict:
    """GroupNorm + SiLU + int8 activation quantizer of a skip concatenation's two
    parts at each resolution: XLA's passes, the fused Pallas kernel (and any knob
    variants named in `only`), and the floor (one elementwise pass: read both
    parts' float32, write int8)."""
    interpret = jax.default_backend() != "gpu"
    progs = {}
    for res, ch in shapes:
        keys = jax.random.split(jax.random.key(3))
        x = tuple(jax.random.normal(k, (samples, res, res, ch)) for k in keys)
        args = (
            x,
            jnp.ones((2 * ch,)),
            jnp.zeros((2 * ch,)),
            jnp.float32(GNQ_BOUND),
            jnp.int32(GNQ_BITS),
        )
        bytes_ = 2.0 * x[0].size * (4 + 1)  # float32 read + int8 write of both
        progs[f"gnq_{res}_xla"] = (
            bytes_, lambda x, s, b, c, n: reference(x, s, b, GNQ_GROUPS, c, n), args
        )  # fmt: skip
        progs[f"gnq_{res}_pallas"] = (
            bytes_,
            lambda x, s, b, c, n: fused(x, s, b, GNQ_GROUPS, c, n, interpret=interpret),
            args,
        )
        progs[f"gnq_{res}_floor"] = (bytes_, int8_floor, args)
        for name, (kernel, knobs) in variants(only, res).items():
            fn = functools.partial(
                kernel,
                num_groups=GNQ_GROUPS,
                interpret=interpret,
                **knobs,
            )
            progs[name] = (
                bytes_,
                lambda x, s, b, c, n, fn=fn: fn(x, s, b, bound=c, bits=n),
                args,
            )
    return progs


def int8_floor(x, *_):
    """One elementwise pass over both parts: read float32, write int8."""
    return jnp.round(jnp.clip(concat(x) * 1.5 + 0.5, -127, 127)).astype(jnp.int8)


def mismatch(fn, x, scale, bias, bound, bits) -> dict:
    """Where a fused kernel's (`fn`'s) int8 values differ from XLA's (`reference`):
    the fraction of elements, and the largest difference in LSBs."""
    ref = jax.jit(reference, static_argnums=3)(x, scale, bias, GNQ_GROUPS, bound, bits)
    diff = jnp.abs(fn(x, scale, bias, bound, bits).astype(jnp.int32) - ref)
    return dict(
        mismatch_fraction=float(jnp.mean(diff != 0)), mismatch_max_lsb=int(diff.max())
    )
