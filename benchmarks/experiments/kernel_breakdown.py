"""Where the device's time goes: kernel time by kind, from a profiler trace.

Each program runs once to compile, then `--repeats` times under `jax.profiler.trace`;
every kernel of the trace is put in one kind through the compiled HLO instruction it
ran (`hlo_op`; by its target, fusion kind and name, not its metadata): convolution
(cuDNN custom call), gemm (cuBLAS or a Triton/cuDNN fusion), reduction (XLA input
fusion: GroupNorm statistics, softmax, FID), concatenate (XLA's concatenate
fusions: a skip concatenation written out, or, with the UNet's skip parts, the
normalize + SiLU + quantizer pass that writes a conv's int8 input from both parts;
one fused with a reduction counts as reduction), elementwise (XLA loop fusion:
normalize, SiLU, quantizers, residual adds), layout (copy/transpose) or other.
`top` names the costliest kernels with their HLO instruction and nominal bytes
(`hlo_bytes`), and `bytes_by_kind` / `bytes_per_s_by_kind` the traffic and bandwidth
of each kind. Programs, on the shipped model at the paper's shapes:

  * quant_f32: the search's fitness of one genome (samples + FID), float32 convs;
  * quant_bf16: the same with bfloat16 integer convolutions;
  * quant_int8: int8 integer convolutions asked for explicitly (`_integer_conv`;
    each row's `conv_operand_types` shows XLA already gives quant_f32 int8 ones);
  * quant_bf16_model: bfloat16 integer convolutions and bfloat16 activations
    throughout (`model.dtype`; not exact: compare the FID it gives);
  * fp: the plain full-precision sampling of the same images and steps;
  * quant_f32_concat, fp_concat: quant_f32 / fp with the UNet as it was before
    `models.norm` (skip concatenations built first, flax's GroupNorm);
  * gn_<res>_<flax|parts|floor>: GroupNorm + SiLU alone on a skip concatenation,
    flax's on the concatenation, `models.norm`'s on its two parts, and one
    elementwise pass (the floor a fused kernel reaches); `floor_bytes_per_s` is
    one read + one write over kernel time;
  * gnq_<res>_<xla|pallas|floor>: GroupNorm + SiLU + the conv's int8 activation
    quantizer on the two parts (`benchmarks/experiments/norm_quant_programs.py`): XLA's two
    passes (`reference`), the fused Pallas kernel (`fused`; interpreted off the
    GPU) and one elementwise pass writing int8, plus kernel settings named
    `gnq_<res>_pallas_b<tile>_w<warps>_s<stages>` or `gnq_<res>_blocks_g<groups>_
    b<tile>_w<warps>` (`fused_blocks`); `floor_bytes` is one float32 read of both
    parts + one int8 write, and each kernel row's `mismatch_fraction` the share of
    int8 values where it differs from the xla one (computed untimed);
  * conv_<res>_<dtype>: one 3x3 convolution of the UNet at each resolution alone,
    float32, and bf16 or int8 operands with float32 output: what the convolution
    kernels reach without the model's other work around them.

  python -m benchmarks.experiments.kernel_breakdown                   # on the GPU
  python -m benchmarks.experiments.kernel_breakdown --samples 136 --out /tmp/k.json  # CPU check
  python -m benchmarks.experiments.kernel_breakdown --only conv_28_f32,conv_28_int8
  python -m benchmarks.experiments.kernel_breakdown --only gnq_28_xla,gnq_28_pallas,gnq_28_floor
  python -m benchmarks.experiments.kernel_breakdown --conv-types benchmarks/results/hlo/*.gz

Command buffers (CUDA graphs) are turned off, so every kernel shows in the trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, provenance, time_fn, write_json
from benchmarks.experiments.trace import (
    breakdown,
    conv_operand_types,
    hlo_bytes,
    hlo_kinds,
    kernel_events,
)

CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def profile(fn, *args, repeats: int = 3, hlo_path: Path | None = None) -> dict:
    """Compiles and warms `fn`, then traces `repeats` runs: wall and kernel time.
    `hlo_path`: where to keep the optimized HLO (to find what a fusion is)."""
    jfn = jax.jit(fn)
    compiled = jfn.lower(*args).compile()
    hlo = compiled.as_text()
    if hlo_path is not None:
        hlo_path.write_text(hlo)
    wall = time_fn(compiled, *args, repeats=repeats)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeats):
                y = jax.block_until_ready(compiled(*args))
        (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        trace = json.load(gzip.open(path))
    events = kernel_events(trace)
    row = dict(
        wall_s=wall, **breakdown(events, hlo_kinds(hlo), repeats, hlo_bytes(hlo))
    )
    row["conv_operand_types"] = conv_operand_types(hlo)
    if jnp.ndim(y) == 0:  # a fitness: the FID it gave, to compare the variants
        row["value"] = float(y)
    return row


def _model_programs(samples: int):
    """The search's fitness under each conv variant and the FP sampling, as
    {name: (flops, fn, args)}, and the number of steps."""
    from benchmarks.perf import _setup
    from benchmarks.perf_sampling import fp_sampler
    from tmpq_jax.models.unet import UNet

    setup = _setup(samples, "float32")
    problem, assets, lm = setup.engine.problem, setup.assets, setup.lm
    g = setup.space.random(jax.random.key(0), 1)[0]
    bf16 = dataclasses.replace(problem, conv_dtype=jnp.bfloat16)
    bf16_model = dataclasses.replace(
        bf16, model=UNet(dataclasses.replace(lm.config, dtype="bfloat16"))
    )
    int8 = dataclasses.replace(problem, conv_dtype=jnp.int8)
    n = setup.space.num_steps
    flops = 2.0 * float(np.sum(setup.registry.macs)) * samples * n
    progs = dict(
        quant_f32=(problem.fid, (assets, g)),
        quant_f32_concat=(with_concat_norm(problem.fid), (assets, g)),
        quant_bf16=(bf16.fid, (assets, g)),
        quant_bf16_model=(bf16_model.fid, (assets, g)),
        quant_int8=(int8.fid, (assets, g)),
        fp=(fp_sampler(lm, assets.sched, n), (assets.params, assets.noise)),
    )
    progs["fp_concat"] = (with_concat_norm(progs["fp"][0]), progs["fp"][1])
    return {k: (flops, *v) for k, v in progs.items()}, n


def with_concat_norm(fn):
    """`fn` traced with the UNet as it was before `models.norm`: each up-path skip
    concatenation built first and normalized by flax's own GroupNorm (on the CPU the
    FID this gives is bit-equal to the old model's)."""
    from unittest import mock

    import flax.linen as nn

    from tmpq_jax.models import norm, unet

    class ConcatThenFlax(nn.GroupNorm):
        def __call__(self, x, **kw):
            return super().__call__(norm.concat(x), **kw)

    def wrapped(*args):
        with mock.patch.object(unet, "GroupNorm", ConcatThenFlax):
            return fn(*args)

    return wrapped


MODEL_PROGRAMS = (
    "quant_f32",
    "quant_f32_concat",
    "quant_bf16",
    "quant_bf16_model",
    "quant_int8",
    "fp",
    "fp_concat",
)
CONV_SHAPES = ((28, 32), (14, 64), (7, 128))  # (resolution, channels) of the UNet


def _conv_programs(samples: int):
    """One 3x3 conv per UNet resolution, f32, bf16 and int8 operands (f32 out for
    both integer-valued kinds: cuDNN's int8 convolutions give s8 or f32)."""
    progs = {}
    for res, ch in CONV_SHAPES:
        x = jnp.round(
            jax.random.uniform(jax.random.key(1), (samples, res, res, ch)) * 60
        )
        w = jnp.round(jax.random.uniform(jax.random.key(2), (3, 3, ch, ch)) * 60 - 30)

        def conv(a, b, out=None):
            return jax.lax.conv_general_dilated(
                a, b, (1, 1), "SAME", dimension_numbers=CONV_DIMS,
                preferred_element_type=out,
            )  # fmt: skip

        flops = 2.0 * samples * res * res * 9 * ch * ch
        progs[f"conv_{res}_f32"] = (flops, conv, (x, w))
        progs[f"conv_{res}_bf16"] = (
            flops,
            lambda a, b: conv(a, b, jnp.float32),
            (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
        )
        progs[f"conv_{res}_int8"] = (
            flops,
            lambda a, b: conv(a, b, jnp.float32),
            (x.astype(jnp.int8), w.astype(jnp.int8)),
        )
    return progs


def _norm_programs(samples: int):
    """GroupNorm + SiLU of a skip concatenation (two parts of the level's width) at
    each resolution: flax's on the concatenation, `models.norm`'s on the parts, and
    the floor a fused kernel would reach: one elementwise pass (one read, one write)."""
    import flax.linen as nn

    from tmpq_jax.models.norm import GroupNorm, concat

    progs, flax_gn, ours = {}, nn.GroupNorm(8), GroupNorm(8)
    for res, ch in CONV_SHAPES:
        keys = jax.random.split(jax.random.key(3))
        x = tuple(jax.random.normal(k, (samples, res, res, ch)) for k in keys)
        p = {"params": {"scale": jnp.ones((2 * ch,)), "bias": jnp.zeros((2 * ch,))}}
        bytes_ = 2.0 * 2 * x[0].size * 4  # one read and one write of float32
        progs[f"gn_{res}_flax"] = (
            bytes_, lambda p, x: nn.silu(flax_gn.apply(p, concat(x))), (p, x)
        )  # fmt: skip
        progs[f"gn_{res}_parts"] = (
            bytes_, lambda p, x: nn.silu(ours.apply(p, x)), (p, x)
        )  # fmt: skip
        progs[f"gn_{res}_floor"] = (
            bytes_, lambda p, x: nn.silu(concat(x) * 1.5 + 0.5), (p, x)
        )  # fmt: skip
    return progs


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma-separated program names")
    ap.add_argument("--out", default=str(RESULTS / "kernel_breakdown.json"))
    ap.add_argument("--hlo-dir", help="keep each program's optimized HLO here")
    ap.add_argument(
        "--conv-types",
        nargs="+",
        metavar="HLO",
        help="print the convolutions' operand types of kept HLO files (.txt[.gz]), "
        "measure nothing",
    )
    return ap


def _programs(samples: int, only: set | None):
    """{name: (amount, fn, args)} of the programs `only` asks for (all: None), and
    the model's steps. `amount`: FLOPs, or for `gn_*` the bytes of one read + one
    write (`gnq_*`: float32 read, int8 write); built only where asked for (the
    inputs are large)."""
    wanted = lambda prefix: not only or any(n.startswith(prefix) for n in only)
    progs, steps = {}, None
    if not only or only & set(MODEL_PROGRAMS):
        progs, steps = _model_programs(samples)
    if wanted("conv_"):
        progs.update(_conv_programs(samples))
    if wanted("gn_"):
        progs.update(_norm_programs(samples))
    if wanted("gnq_"):
        from benchmarks.experiments import norm_quant_programs

        progs.update(norm_quant_programs.programs(samples, CONV_SHAPES, only))
    return {k: v for k, v in progs.items() if not only or k in only}, steps


def _measure(name: str, amount: float, fn, args, repeats: int, hlo_dir) -> dict:
    """One program's row: its trace breakdown plus its rate (FLOP/s over wall time;
    for `gn_*` and `gnq_*`, bytes/s over kernel time), or the error it raised."""
    try:
        hlo = hlo_dir / f"{name}.hlo.txt" if hlo_dir else None
        row = profile(fn, *args, repeats=repeats, hlo_path=hlo)
    except Exception as e:  # noqa: BLE001 - e.g. int8 convs unsupported
        return dict(error=f"{type(e).__name__}: {e}"[:400])
    if name.startswith(("gn_", "gnq_")):
        row["floor_bytes"] = amount
        row["floor_bytes_per_s"] = amount / (row["busy_us"] * 1e-6)
        if name.startswith("gnq_") and not name.endswith(("_xla", "_floor")):
            from benchmarks.experiments.norm_quant_programs import mismatch

            row.update(mismatch(fn, *args))  # after (outside) the timed runs
        return row
    row["flops"] = amount
    row["flops_per_s"] = amount / row["wall_s"]
    conv_us = row["us_by_kind"]["convolution"]
    if name.startswith("conv_") and conv_us:
        row["conv_kernel_flops_per_s"] = amount / (conv_us * 1e-6)
    return row


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    if a.conv_types:
        for f in a.conv_types:
            text = (gzip.open if f.endswith(".gz") else open)(f, "rt").read()
            print(f, json.dumps(conv_operand_types(text)))
        return
    # before the backend starts: kernels inside CUDA graphs would not be traced
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_command_buffer=".strip()
    out = Path(a.out)
    only = set(a.only.split(",")) if a.only else None
    t0 = time.perf_counter()
    progs, steps = _programs(a.samples, only)
    hlo_dir = Path(a.hlo_dir) if a.hlo_dir else None
    if hlo_dir:
        hlo_dir.mkdir(parents=True, exist_ok=True)
    raw = dict(
        provenance(), samples=a.samples, steps=steps, repeats=a.repeats, programs={}
    )
    for name, (amount, fn, args) in progs.items():
        row = _measure(name, amount, fn, args, a.repeats, hlo_dir)
        raw["programs"][name] = row
        keys = ("wall_s", "busy_us", "fraction_by_kind", "error")
        print(name, json.dumps({k: row.get(k) for k in keys}), flush=True)
        write_json(out.name, raw, out.parent)
    raw["wall_s"] = time.perf_counter() - t0
    write_json(out.name, raw, out.parent)


if __name__ == "__main__":
    main()
