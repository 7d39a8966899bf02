"""Qwix-served genomes against SERVE, on the shipped UNet and DiT.

For each model and uniform width WxAy: CONVERT the genome (`quant/export.py`),
export it as `tmpq export --format qwix --matmul-fallback float` does
(`to_qwix` -> `save_qwix_export` -> `load_qwix_export`: stock Qwix serves it),
and compare Qwix's output with SERVE's on one fixed batch of noised test images
at timesteps 5..990 (the DiT: t = 0.005..0.99 and class labels, every other one
the null class, i.e. both branches of classifier-free guidance). Each row:
`max_abs_err`, `rel_err` (of max |SERVE|), the mean errors against each other
and against the float model, `how` Qwix serves it (native int8 / int4 / emulated
intN / refused: the one-line reason; ops Qwix serves in float are named), and
forwards per second of each path at the batch (jit compiled once, best of
`--repeats` after a warm-up).

The genome is `QuantBits.uniform` with attention's p.v value operand at 8: Qwix
quantizes a matmul's two operands at one width, and the softmax one is held at 8.
Calibration: min-MSE (`quant/solver.py`) at the rows' widths, made here unless
`--calibration MODEL=DIR` gives one.

    python -m benchmarks.qwix_export [--models unet,dit] [--widths w8a8,w4a8]
        [--batch 64] [--out qwix_export.json]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import REPO, provenance, time_fn, write_json
from tmpq_jax.errors import UserError
from tmpq_jax.quant import QuantBits
from tmpq_jax.quant import qwix_export as qx
from tmpq_jax.quant import qwix_files as qf
from tmpq_jax.quant.export import convert, serve_apply

MODELS = {"unet": "checkpoints/fmnist_unet", "dit": "checkpoints/fmnist_dit"}
TIMES = (5, 40, 120, 250, 400, 600, 800, 990)  # of 1000: cycled over the batch


def load(name: str, widths, calibration: str | None = None):
    """(LoadedModel, registry, QParams, candidates) of a shipped model."""
    from tmpq_jax.quant.calibration import model_fingerprint
    from tmpq_jax.quant.calibration_io import load_calibration, read_calibration_meta
    from tmpq_jax.quant.solver import solve
    from tmpq_jax.user_model import resolve_model

    lm = resolve_model(REPO / MODELS.get(name, name))
    reg = lm.layer_registry()
    if calibration is not None:
        cands = tuple(read_calibration_meta(calibration)["candidates"])
        qp, _ = load_calibration(calibration, reg, cands, model_fingerprint(lm.card))
        return lm, reg, qp, cands
    cands = tuple(sorted({8, *(b for wa in widths for b in wa)}, reverse=True))
    qp, _, _ = solve(lm, 0, cands, registry=reg, progress=False)
    return lm, reg, qp, cands


def noised_batch(lm, batch: int, data_dir=None) -> tuple[tuple, str]:
    """The model's inputs (x_t, t[, y]) at TIMES, and what x0 is."""
    from tmpq_jax.data.loaders import load_fmnist, to_model_range

    try:  # optional: the data lives outside the repository
        data = load_fmnist("test", data_dir)
        x0 = jnp.asarray(to_model_range(data.images[:batch]))
        y, what = jnp.asarray(data.labels[:batch]), f"fmnist test[:{batch}]"
    except (UserError, OSError):
        shape = (batch, lm.config.image_size, lm.config.image_size, lm.config.channels)
        x0 = jax.random.uniform(jax.random.key(1), shape, minval=-1.0, maxval=1.0)
        y, what = jnp.arange(batch) % 10, f"uniform noise x0 [{batch}] (no FMNIST)"
    steps = jnp.asarray([TIMES[i % len(TIMES)] for i in range(batch)], jnp.int32)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    if lm.prediction == "eps":  # DDPM: sqrt(ab) x0 + sqrt(1 - ab) noise
        ab = lm.sched.alphas_cumprod[steps][:, None, None, None]
        return (jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise, steps), what
    t = steps.astype(jnp.float32) / 1000.0  # flow: (1 - t) x0 + t noise
    x = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    if not lm.num_classes:
        return (x, t), what
    odd = jnp.arange(batch) % 2 == 1  # CFG's unconditional branch: the null label
    return (x, t, jnp.where(odd, lm.null_label, y).astype(jnp.int32)), what


def uniform_bits(reg, w_bits: int, a_bits: int) -> QuantBits:
    """Uniform WxAy with p.v's value operand at 8, beside its 8-bit softmax."""
    u = QuantBits.uniform(reg, w_bits, a_bits)
    pinned = jnp.asarray(reg.pinned_lhs_bits > 0)
    return QuantBits(jnp.where(pinned, 8, u.w_bits), u.a_bits)


def how_served(layers: list[dict]) -> str:
    """Qwix's qtypes in a few words, and the ops it serves in float."""
    served = [r for r in layers if r["served"] == "qwix"]
    qts = {r[k] for r in served for k in ("weight_qtype", "act_qtype")}
    words = ["native int8"] if "int8" in qts else []
    words += ["native int4"] if "int4" in qts else []
    words += [f"emulated {q}" for q in sorted(qts - {"int8", "int4"})]
    boxed = sum("container" in r.get("note", "") for r in layers)
    if boxed:  # a conv's kernel takes its rule's (activation's) container
        words.append(f"{boxed} kernels in a wider container")
    floats = [r["name"] for r in layers if r["served"] == "float"]
    if floats:
        words.append(f"float: {len(floats)} ops ({', '.join(floats[:2])}, ...)")
    return "; ".join(words)


def compare(model, params, reg, qparams, cands, args, w_bits, a_bits, repeats=3):
    """One row: the WxAy genome served by Qwix (through the export files) against
    SERVE on `args`; `repeats` > 0 also times both. A width Qwix refuses is a
    row with `how` "refused: <reason>" and no errors."""
    row = dict(w_bits=w_bits, a_bits=a_bits)
    qmodel = convert(params, reg, uniform_bits(reg, w_bits, a_bits), qparams, cands)
    one = [a[:1] for a in args]
    try:
        export = qx.to_qwix(model, qmodel, reg, one, matmul_fallback="float")
    except UserError as e:
        return dict(row, how=f"refused: {e}", max_abs_err=None, rel_err=None)
    with tempfile.TemporaryDirectory() as tmp:  # the files, as a user gets them
        path = qf.save_qwix_export(Path(tmp) / "qwix", export)
        qm, variables = qf.load_qwix_export(path, model, *one)
    serve = jax.jit(lambda q, *a: serve_apply(model, q, *a, registry=reg))
    qwix_fn = jax.jit(qm.apply)
    ref, y = serve(qmodel, *args), qwix_fn(variables, *args)
    fp = jax.jit(model.apply)({"params": params}, *args)
    err = float(jnp.abs(y - ref).max())
    row.update(
        how=how_served(export.layers),
        max_abs_err=err,
        rel_err=err / float(jnp.abs(ref).max()),
        mean_abs_err=float(jnp.abs(y - ref).mean()),
        serve_vs_float_mean=float(jnp.abs(ref - fp).mean()),
        qwix_vs_float_mean=float(jnp.abs(y - fp).mean()),
    )
    if repeats > 0:
        n = args[0].shape[0]
        t_serve = time_fn(serve, qmodel, *args, repeats=repeats)
        t_qwix = time_fn(qwix_fn, variables, *args, repeats=repeats)
        row.update(serve_images_per_s=n / t_serve, qwix_images_per_s=n / t_qwix)
    return row


def parse_widths(spec: str) -> list[tuple[int, int]]:
    """'w8a8,w4a8' -> [(8, 8), (4, 8)]"""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"w(\d)a(\d)", part.strip().lower())
        if not m:
            raise UserError(f"--widths {part!r}: write widths like w8a8,w4a8.")
        out.append((int(m[1]), int(m[2])))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="unet,dit")
    p.add_argument("--widths", default="w8a8,w6a6,w4a8,w4a4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calibration", action="append", default=[], help="MODEL=DIR")
    p.add_argument("--data-dir", help="Fashion-MNIST idx directory (optional)")
    p.add_argument("--out", default="qwix_export.json")
    a = p.parse_args(argv)
    widths, calib = parse_widths(a.widths), dict(c.split("=", 1) for c in a.calibration)
    rows, inputs = [], {}
    for name in a.models.split(","):
        t0 = time.perf_counter()
        lm, reg, qp, cands = load(name, widths, calib.get(name))
        args, inputs[name] = noised_batch(lm, a.batch, a.data_dir)
        took = time.perf_counter() - t0
        print(f"{name}: {len(reg)} layers, calibrated {cands} in {took:.0f} s")
        for w, ab in widths:
            row = compare(lm.model, lm.params, reg, qp, cands, args, w, ab, a.repeats)
            rows.append(dict(model=f"fmnist_{name}", **row))
            print(rows[-1], flush=True)
    import qwix

    head = dict(provenance(), qwix_version=qwix.__version__, batch=a.batch)
    head.update(inputs=inputs, timesteps_of_1000=list(TIMES))
    head["throughput"] = "forwards of the batch, images/s: best of --repeats"
    head["calibration"] = {k: calib.get(k, "min-MSE, made here") for k in inputs}
    out = write_json(a.out, dict(head, rows=rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
