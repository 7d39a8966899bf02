"""Where the device's time goes: kernel time by kind, from a profiler trace (issue [5/7]).

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
  * quant_int8: int8 integer convolutions with int32 sums (whether XLA runs them
    as int8 kernels shows in `top`);
  * quant_bf16_model: bfloat16 integer convolutions and bfloat16 activations
    throughout (`model.dtype`; not exact: compare the FID it gives);
  * fp: the plain full-precision sampling of the same images and steps;
  * quant_f32_concat, fp_concat: quant_f32 / fp with the UNet as it was before
    `models.norm` (skip concatenations built first, flax's GroupNorm);
  * gn_<res>_<flax|parts|floor>: GroupNorm + SiLU alone on a skip concatenation,
    flax's on the concatenation, `models.norm`'s on its two parts, and one
    elementwise pass (the floor a fused kernel reaches); `floor_bytes_per_s` is
    one read + one write over kernel time;
  * conv_<res>_<dtype>: one 3x3 convolution of the UNet at each resolution alone,
    float32, and bf16 or int8 operands with float32 output: what the convolution
    kernels reach without the model's other work around them.

  python -m benchmarks.kernel_breakdown                   # on the GPU
  python -m benchmarks.kernel_breakdown --samples 136 --out /tmp/k.json  # CPU check
  python -m benchmarks.kernel_breakdown --only conv_28_f32,conv_28_int8
  python -m benchmarks.kernel_breakdown --conv-types benchmarks/results/hlo/*.gz

Command buffers (CUDA graphs) are turned off, so every kernel shows in the trace.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, provenance, time_fn, write_json

CONV_DIMS = ("NHWC", "HWIO", "NHWC")
KINDS = (
    "convolution",
    "gemm",
    "reduction",
    "concatenate",
    "elementwise",
    "layout",
    "other",
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


_ARRAY = re.compile(r"\b(pred|[subfc]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _shape_bytes(shape: str, first_only: bool = False) -> int:
    """Bytes of an HLO shape string (`f32[8,28]{1,0}` or a tuple of them)."""
    total = 0
    for dt, dims in _ARRAY.findall(shape):
        if dt.startswith("f8"):
            size = 1
        else:
            size = _DTYPE_BYTES.get(dt) or max(1, int(dt[1:]) // 8)
        total += size * int(np.prod([int(d) for d in dims.split(",") if d]))
        if first_only:  # a custom call's (result, scratch workspace): the result
            break
    return total


def hlo_bytes(hlo_text: str) -> dict[str, int]:
    """Instruction name -> nominal bytes it moves: its result plus each distinct
    operand once (what a kernel of it reads and writes if it touches every element
    once; a fusion that slices or broadcasts an operand moves less, one that re-reads
    moves more; L2 hits are not seen; sub-byte types count a byte an element).
    Operands are read as the `%names` in the instruction's first parenthesis, which
    is how this XLA prints them (no operand shapes or layouts inline)."""
    shapes, ops = {}, {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m.groups()
        shape = line[line.index("=") + 1 : m.end(2) - len(op)]
        shapes[name] = (shape, op == "custom-call")
        args = line[m.end() :].split(")", 1)[0]
        ops[name] = dict.fromkeys(re.findall(r"%([\w.\-]+)", args))  # once each
    out = {}
    for name, operands in ops.items():
        nbytes = _shape_bytes(*shapes[name])
        for o in operands:
            if o in shapes:
                nbytes += _shape_bytes(shapes[o][0], first_only=shapes[o][1])
        out[name] = nbytes
    return out


def conv_operand_types(hlo_text: str) -> dict[str, int]:
    """How many convolutions (cuDNN custom calls or HLO convolutions) take which
    operand element types, e.g. {"s8 x s8": 36}: whether XLA runs int8 kernels."""
    types, found = {}, collections.Counter()
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            arr = _ARRAY.search(line[line.index("=") + 1 : m.end(2)])
            types[m.group(1)] = arr.group(1) if arr else "?"
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        conv = m and (m.group(2) == "convolution" or "convForward" in line)
        if conv:
            args = line[m.end() :].split(")", 1)[0]
            ops = re.findall(r"%([\w.\-]+)", args)[:2]
            found[" x ".join(types.get(o, "?") for o in ops)] += 1
    return dict(found)


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, for the instructions of optimized HLO text."""
    kinds = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m.groups()
        kinds[name] = _kind(name, op, line)
    return kinds


def _kind(name: str, op: str, line: str) -> str:
    """By the instruction's own fields (its name, custom-call target, fusion kind
    and called computation), never its metadata: a gemm's op_name may say conv."""
    if op == "custom-call":
        m = _TARGET.search(line)
        target = m.group(1).lower() if m else ""
        if "conv" in target:
            return "convolution"
        return "gemm" if ("gemm" in target or "matmul" in target) else "other"
    if op == "fusion":
        calls = _CALLS.search(line)
        callee = calls.group(1).lower() if calls else ""
        if "kind=kCustom" in line:
            return "convolution" if "conv" in callee else "gemm"
        if "kind=kInput" in line:  # XLA emits concatenations as input fusions too
            low = name.lower()
            return (
                "concatenate"
                if "concatenate" in low and "reduce" not in low
                else "reduction"
            )
        if "kind=kLoop" in line:
            return "elementwise"
        return "other"
    if op in ("copy", "transpose", "copy-start", "copy-done"):
        return "layout"
    if op in ("convolution",):
        return "convolution"
    if op in ("dot",):
        return "gemm"
    if op in ("reduce", "reduce-window"):
        return "reduction"
    if op == "concatenate":
        return "concatenate"
    return "other"


def _kind_by_name(kernel: str) -> str:
    """Fallback for kernels without an `hlo_op`, by the kernel's own name."""
    low = kernel.lower()
    if any(s in low for s in ("conv", "fprop", "dgrad", "wgrad", "implicit")):
        return "convolution"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "matmul")):
        return "gemm"
    if "reduce" in low or "reduction" in low:
        return "reduction"
    if "transpose" in low or "copy" in low:
        return "layout"
    return "other"


def kernel_events(trace: dict) -> list[dict]:
    """The device's kernel events of a perfetto trace: on GPU the stream lines of
    the device process (its other lines repeat the same kernels); elsewhere the
    events that name an hlo_op (on the CPU these overlap across threads, so the
    kinds' shares are of summed thread time, not of wall time)."""
    ev = trace.get("traceEvents", [])
    procs = {e["pid"]: e["args"]["name"] for e in ev if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in ev
        if e.get("name") == "thread_name"
    }
    dev = {p for p, n in procs.items() if "/device:GPU" in n}
    out = []
    for e in ev:
        if e.get("ph") != "X":
            continue
        if dev:
            line = threads.get((e["pid"], e.get("tid")), "")
            if e["pid"] in dev and line.startswith("Stream"):
                out.append(e)
        elif "hlo_op" in e.get("args", {}):
            out.append(e)
    return out


def breakdown(
    events: list[dict],
    kinds: dict[str, str],
    repeats: int,
    nbytes: dict[str, int] | None = None,
) -> dict:
    """Per-run microseconds by kind, and the costliest kernels; with `nbytes`
    (`hlo_bytes`), the nominal bytes each kind moves and the bandwidth that is."""
    by_kind, bytes_by_kind = collections.Counter(), collections.Counter()
    by_kernel, bytes_by_kernel = collections.Counter(), collections.Counter()
    nbytes = nbytes or {}
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        kind = kinds.get(op) if op else None
        kind = kind or _kind_by_name(e["name"])
        key = (kind, op or "", e["name"][:100])
        by_kind[kind] += e["dur"] / repeats
        by_kernel[key] += e["dur"] / repeats
        b = nbytes.get(op, 0) / repeats if op else 0.0
        bytes_by_kind[kind] += b
        bytes_by_kernel[key] += b
    busy = sum(by_kind.values())
    row = dict(
        busy_us=busy,
        kernels_per_run=len(events) / repeats,
        us_by_kind={k: by_kind.get(k, 0.0) for k in KINDS},
        fraction_by_kind={
            k: by_kind.get(k, 0.0) / busy if busy else 0.0 for k in KINDS
        },
        top=[
            dict(
                kind=k, op=op, kernel=name, us=us, bytes=bytes_by_kernel[(k, op, name)]
            )
            for (k, op, name), us in by_kernel.most_common(15)
        ],
    )
    if nbytes:
        row["bytes_by_kind"] = {k: bytes_by_kind.get(k, 0.0) for k in KINDS}
        row["bytes_per_s_by_kind"] = {
            k: bytes_by_kind[k] / (by_kind[k] * 1e-6) for k in KINDS if by_kind[k]
        }
    return row


def profile(fn, *args, repeats: int = 3, hlo_path: Path | None = None) -> dict:
    """Compiles and warms `fn`, then traces `repeats` runs: wall and kernel time.
    `hlo_path`: where to keep the optimized HLO (to find what a fusion is)."""
    jfn = jax.jit(fn)
    compiled = jfn.lower(*args).compile()
    kinds, nbytes = hlo_kinds(compiled.as_text()), hlo_bytes(compiled.as_text())
    if hlo_path is not None:
        hlo_path.write_text(compiled.as_text())
    wall = time_fn(compiled, *args, repeats=repeats)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeats):
                y = jax.block_until_ready(compiled(*args))
        (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        trace = json.load(gzip.open(path))
    events = kernel_events(trace)
    row = dict(wall_s=wall, **breakdown(events, kinds, repeats, nbytes))
    row["conv_operand_types"] = conv_operand_types(compiled.as_text())
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


def main(argv=None) -> None:
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
    a = ap.parse_args(argv)
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
    progs, steps = {}, None
    if not only or only & set(MODEL_PROGRAMS):
        progs, steps = _model_programs(a.samples)
    progs.update(_conv_programs(a.samples))
    progs.update(_norm_programs(a.samples))
    hlo_dir = Path(a.hlo_dir) if a.hlo_dir else None
    if hlo_dir:
        hlo_dir.mkdir(parents=True, exist_ok=True)
    raw = dict(
        provenance(), samples=a.samples, steps=steps, repeats=a.repeats, programs={}
    )
    for name, (fl, fn, args) in progs.items():
        if only and name not in only:
            continue
        try:
            hlo = hlo_dir / f"{name}.hlo.txt" if hlo_dir else None
            row = profile(fn, *args, repeats=a.repeats, hlo_path=hlo)
            if name.startswith("gn_"):  # bandwidth, of one read + one write
                row["floor_bytes"] = fl
                row["floor_bytes_per_s"] = fl / (row["busy_us"] * 1e-6)
                raw["programs"][name] = row
                print(name, row["wall_s"], row["busy_us"], flush=True)
                write_json(out.name, raw, out.parent)
                continue
            row["flops"] = fl
            row["flops_per_s"] = fl / row["wall_s"]
            conv_us = row["us_by_kind"]["convolution"]
            if name.startswith("conv_") and conv_us:
                row["conv_kernel_flops_per_s"] = fl / (conv_us * 1e-6)
        except Exception as e:  # noqa: BLE001 - e.g. int8 convs unsupported
            row = dict(error=f"{type(e).__name__}: {e}"[:400])
        raw["programs"][name] = row
        brief = {
            k: row.get(k) for k in ("wall_s", "busy_us", "fraction_by_kind", "error")
        }
        print(name, json.dumps(brief, default=str), flush=True)
        write_json(out.name, raw, out.parent)
    raw["wall_s"] = time.perf_counter() - t0
    write_json(out.name, raw, out.parent)


if __name__ == "__main__":
    main()
