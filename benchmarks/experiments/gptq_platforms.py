"""Why `gptaq` fails on the GPU alone (docs/qwix.md): the same calibration run on
a GPU machine's CPU and on its GPU, compared layer by layer.

    python -m benchmarks.experiments.gptq_platforms --out-dir DIR    # a GPU machine
    python -m benchmarks.experiments.gptq_platforms --variants cpu,cpu_tf32 --out-dir DIR

Variants: `cpu`, `gpu` (the default backend), `cpu_tf32` (the CPU with every f32
dot's operands rounded to TF32 unless 'highest' is asked: the GPU's default dot,
at the primitive, not the convolutions), `cpu_tf32_conv` (every f32 dot and
convolution); `--python` picks the interpreter (another jax).
Each variant runs in its own process (`--worker`, JAX_PLATFORMS=cpu for the CPU):
min-MSE and then gptaq on the shipped UNet at a reduced setting (--timesteps x
--samples, --candidates 8,4), then the one-step eps MSE against the float model at
W8A8 and W4A8, round-to-nearest and gptaq, on a fresh batch from the same key
(and, on a variant after `cpu`, gptaq with the CPU's kernels: calibration or
evaluation?).
The parent compares the stored kernels: per layer and width, the largest
difference in steps of that layer's grid, and the first layer where they part.
Writes DIR/gptq_platforms.json (and each platform's kernels as .npz).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("cpu", "gpu", "cpu_tf32", "cpu_tf32_conv")


def tf32(x):
    """`x` rounded to TF32 (10 mantissa bits, to nearest) where it is f32."""
    import jax
    import jax.numpy as jnp

    if getattr(x, "dtype", None) != jnp.float32:
        return x
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    b = (b + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _emulate_tf32(convs: bool) -> None:
    """Every f32 dot_general (and with `convs` every convolution) the program binds
    -- the model's forward, the patches, GPTQ's statistics, the evaluation -- with
    its operands rounded to TF32, unless 'highest' is asked: as a GPU runs them."""
    from jax._src import config
    from jax._src.lax import convolution
    from jax._src.lax import lax as lax_impl

    prims = [lax_impl.dot_general_p] + (
        [convolution.conv_general_dilated_p] if convs else []
    )
    for prim in prims:
        original = prim.bind

        def bind(*args, _original=original, **params):
            asked = params.get("precision")
            default = config.default_matmul_precision.value in ("highest", "float32")
            if not default and (asked is None or asked == (None, None)):
                args = tuple(tf32(a) for a in args)
            return _original(*args, **params)

        prim.bind = bind


def worker(args) -> None:
    import jax
    import jax.numpy as jnp

    from tmpq_jax.quant import QuantBits, gptq_seq, quantized_apply
    from tmpq_jax.quant.calibration import calibrate, calibration_set
    from tmpq_jax.user_model import resolve_model

    lm, key = resolve_model(), jax.random.key(0)
    reg = lm.layer_registry()
    rtn, _ = calibrate(
        lm, key, args.cands, args.timesteps, args.samples, False, registry=reg
    )
    xs, ts, *extra = calibration_set(
        lm, jax.random.fold_in(key, 0), args.timesteps, args.samples
    )
    t0, fn = time.perf_counter(), gptq_seq.gptq_seq_qparams
    if args.worker in ("cpu_tf32", "cpu_tf32_conv"):  # without exact_f32's 'highest'
        _emulate_tf32(convs=args.worker == "cpu_tf32_conv")
        fn = fn.__wrapped__
    qp, info = fn(lm.model, lm.params, reg, rtn, xs, ts, jax.random.fold_in(key, 3),
                  extra=tuple(extra))  # fmt: skip
    seconds = time.perf_counter() - t0
    xe, te, *_ = calibration_set(
        lm, jax.random.fold_in(key, 7), args.timesteps, args.samples
    )
    y = lm.model.apply({"params": lm.params}, xe, te)

    def err(q, w, a):
        bits = QuantBits.uniform(reg, w, a)
        yq = quantized_apply(lm.model, {"params": lm.params}, xe, te, bits=bits,
                             registry=reg, qparams=q, candidates=args.cands)  # fmt: skip
        return float(jnp.mean((yq - y) ** 2))

    errors = {
        f"W{w}A8": {"rtn": err(rtn, w, 8), "gptaq": err(qp, w, 8)} for w in args.cands
    }
    ref = Path(args.out_dir) / "cpu.npz"
    if args.worker != "cpu" and ref.exists():  # the CPU's kernels, evaluated here
        got = np.load(ref)
        n = len(reg)
        qp_cpu = qp.replace(
            w_kernel=tuple(jnp.asarray(got[f"k{i}"]) if f"k{i}" in got else None for i in range(n)),
            w_clip=tuple(jnp.asarray(got[f"c{i}"]) if f"c{i}" in got else qp.w_clip[i] for i in range(n)),
        )  # fmt: skip
        for w in args.cands:
            errors[f"W{w}A8"]["gptaq_cpu_kernels"] = err(qp_cpu, w, 8)
    arrays = {}
    for i in range(len(reg)):
        if qp.w_kernel[i] is not None:
            arrays[f"k{i}"] = np.asarray(qp.w_kernel[i], np.float32)
            arrays[f"c{i}"] = np.asarray(qp.w_clip[i], np.float32)
    np.savez(Path(args.out_dir) / f"{args.worker}.npz", **arrays)
    summary = dict(
        device=jax.devices()[0].device_kind, jax_version=jax.__version__,
        errors=errors, gptaq_seconds=seconds, rtn_kept=info["rtn_kept"],
        fast_inputs_fallbacks=sum(v is None for v in gptq_seq._PERMS.values()),
        layers=[layer.name for layer in reg],
    )  # fmt: skip
    (Path(args.out_dir) / f"{args.worker}.json").write_text(json.dumps(summary))
    print(args.worker, summary["device"], errors, f"{seconds:.0f} s", flush=True)


def compare(out: Path, ref: str, other: str, cands) -> dict:
    """Kernels of `other` against `ref`: per layer and width, in grid steps."""
    a, b = (np.load(out / f"{p}.npz") for p in (ref, other))
    sa = json.loads((out / f"{ref}.json").read_text())
    rows, first = [], None
    for key in sorted((k for k in a.files if k[0] == "k"), key=lambda k: int(k[1:])):
        i = int(key[1:])
        ka, kb = a[key], b[key]
        for w, bits in enumerate(cands):  # leading axis: the widths
            axes = tuple(range(1, ka.ndim - 1))  # per output channel (last axis)
            step = np.max(np.abs(ka[w]), axis=axes, keepdims=True) / (
                2 ** (bits - 1) - 0.5
            )
            d = float(np.max(np.abs(ka[w] - kb[w]) / np.maximum(step, 1e-12)))
            rows.append(dict(layer=sa["layers"][i], bits=bits, max_grid_steps=d))
            if first is None and d > 0.5:
                first = rows[-1]
    return dict(first_layer_apart=first, kernels=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--candidates", default="8,4", help="widths calibrated")
    ap.add_argument("--variants", default="cpu,gpu", help="cpu, gpu, cpu_tf32")
    ap.add_argument("--python", default=sys.executable, help="the workers' interpreter")
    ap.add_argument("--name", default="gptq_platforms.json")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cands = tuple(int(c) for c in args.candidates.split(","))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(
            f"error: unknown variants {sorted(unknown)}; use {', '.join(VARIANTS)}"
        )
    for v in variants:
        env = dict(os.environ, **({"JAX_PLATFORMS": "cpu"} if v != "gpu" else {}))
        cmd = [args.python, "-m", __spec__.name, "--worker", v, "--out-dir", args.out_dir,
               "--timesteps", str(args.timesteps), "--samples", str(args.samples),
               "--candidates", args.candidates]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
    result = dict(
        command="python -m benchmarks.experiments.gptq_platforms " + " ".join(sys.argv[1:]),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), setting=dict(
            timesteps=args.timesteps, samples=args.samples, candidates=args.cands),
        variants={v: json.loads((out / f"{v}.json").read_text()) for v in variants},
        kernels_vs_first={v: compare(out, variants[0], v, args.cands) for v in variants[1:]},
    )  # fmt: skip
    (out / args.name).write_text(json.dumps(result, indent=1))
    for v, r in result["variants"].items():
        print(v, r["device"], r["jax_version"], r["errors"])
    for v, c in result["kernels_vs_first"].items():
        print(f"{v}: first layer apart from {variants[0]}:", c["first_layer_apart"])


if __name__ == "__main__":
    main()
