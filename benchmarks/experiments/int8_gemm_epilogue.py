"""Where int8 serving loses to bf16 on a big DiT (issue 26): one dense layer at
DiT-XL/2's shapes, bf16 against int8 and fp8, with and without what surrounds the
GEMM (the activation's quantization before it, the dequantization after it).

    python -m benchmarks.experiments.int8_gemm_epilogue [--out-dir DIR] [--repeats 20]

Rows per shape (M tokens x K in -> N out; M = 64 images x 256 tokens):
  bf16            x @ w in bf16, bf16 out (the full-precision forward's GEMM)
  int8_gemm       int8 @ int8 -> int32 alone (operands already integer)
  int8_dequant    + the int32 result times both scales, to bf16 (SERVE's epilogue)
  int8_layer      + the activation quantized first with a calibrated per-tensor
                  scale, as SERVE does (bf16 -> divide, round, clip, int8)
  fp8_layer       e4m3 @ e4m3 -> bf16 with per-tensor scales, the activation cast
                  first (GPUs of compute capability 8.9+ only)
If int8_gemm beats bf16 but int8_layer does not, the loss is in the surrounding
passes (each reads or writes M x N or M x K once more), not in the GEMM: what to fuse.
Each is one jitted function; times are medians after a warm-up. The outputs are
checked against the float product (relative error printed).
"""

import argparse

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.common import provenance, write_json
from benchmarks.perf_serve import E4M3, fp8_supported, median_time

SHAPES = {  # DiT-XL/2: hidden 1152, MLP 4608
    "mlp_in": (16384, 1152, 4608),
    "mlp_out": (16384, 4608, 1152),
    "attn_proj": (16384, 1152, 1152),
}
DN = (((1,), (0,)), ((), ()))


def _int8(x, axis):
    """Symmetric int8 of `x`, one scale per slice along `axis` kept (absmax / 127)."""
    s = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True) / 127.0
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / s), -127, 127).astype(jnp.int8)
    return q, s


def variants(fp8: bool) -> dict:
    def bf16(x, w, *_):
        return x @ w

    def int8_gemm(xq, wq, *_):
        return lax.dot_general(xq, wq, DN, preferred_element_type=jnp.int32)

    def int8_dequant(xq, wq, xs, ws):
        acc = lax.dot_general(xq, wq, DN, preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * xs * ws).astype(jnp.bfloat16)

    def int8_layer(x, wq, ws, xs):  # xs: a static (calibrated) scalar
        xq = jnp.clip(jnp.round(x.astype(jnp.float32) / xs), -127, 127)
        return int8_dequant(xq.astype(jnp.int8), wq, xs, ws)

    def fp8_layer(x, w8, wscale):
        xs = jnp.max(jnp.abs(x.astype(jnp.float32))) / 448.0
        x8 = (x.astype(jnp.float32) / xs).astype(E4M3)
        out = lax.dot_general(x8, w8, DN, preferred_element_type=jnp.bfloat16)
        return (out.astype(jnp.float32) * (xs * wscale)).astype(jnp.bfloat16)

    fns = dict(bf16=bf16, int8_gemm=int8_gemm, int8_dequant=int8_dequant,
               int8_layer=int8_layer)  # fmt: skip
    if fp8:
        fns["fp8_layer"] = fp8_layer
    return {k: jax.jit(f) for k, f in fns.items()}


def measure(m: int, k: int, n: int, repeats: int, fp8: bool, key) -> dict:
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / k**0.5).astype(jnp.bfloat16)
    xq, xs = _int8(x, axis=None)  # one scale for the tensor, as calibrated
    wq, ws = _int8(w, axis=0)
    wscale = jnp.max(jnp.abs(w.astype(jnp.float32))) / 448.0
    args = {
        "bf16": (x, w),
        "int8_gemm": (xq, wq),
        "int8_dequant": (xq, wq, xs, ws),
        "int8_layer": (x, wq, ws, xs),
        "fp8_layer": (x, (w.astype(jnp.float32) / wscale).astype(E4M3), wscale),
    }
    ref = x.astype(jnp.float32) @ w.astype(jnp.float32)
    row, flops = {}, 2.0 * m * k * n
    for name, fn in variants(fp8).items():
        t = median_time(fn, *args[name], repeats=repeats)
        out = fn(*args[name]).astype(jnp.float32)
        if name == "int8_gemm":
            out = out * xs * ws
        err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        row[name] = {"ms": round(t * 1e3, 4), "tflops": round(flops / t / 1e12, 1),
                     "rel_err": round(err, 5)}  # fmt: skip
    base = row["bf16"]["ms"]
    for name in row:
        row[name]["vs_bf16"] = round(base / row[name]["ms"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--scale", type=int, default=1, help="divide M, K, N (CPU checks)")
    a = ap.parse_args()
    fp8 = fp8_supported(jax.devices()[0]) is None
    rows = []
    for i, (name, shape) in enumerate(SHAPES.items()):
        m, k, n = (d // a.scale for d in shape)
        r = measure(m, k, n, a.repeats, fp8, jax.random.key(i))
        rows.append({"layer": name, "m": m, "k": k, "n": n, **r})
        print(name, {v: (r[v]["ms"], r[v]["vs_bf16"], r[v]["rel_err"]) for v in r})
    print(write_json("int8_gemm_epilogue.json", {**provenance(), "rows": rows}, a.out_dir))


if __name__ == "__main__":
    main()
