"""What block reconstruction (learned step sizes) buys over min-MSE, per bit-width.

  python -m benchmarks.quant_reconstruction [--checkpoint DIR] [--min-mse DIR]
      [--recon DIR] [--steps 300] [--fid-samples 2000] [--fid-widths 8,6]

Starts from the min-MSE calibration `--min-mse` (default: the shipped one), runs
`reconstruction.reconstruct` on the calibration set that calibration was made from
(rebuilt from its settings: seed, timesteps, samples; the same set and keys as
`tmpq calibrate --reconstruct`) and saves the result to `--recon` (default
runs/calib_recon; reused if it is already there). Then, on the held-out set of
`quant_sensitivity` (float DDIM trajectories, another key), uniform WbAb for every
calibrated width: relative eps error, without t = 0, and the DDIM step error, min-MSE
vs reconstruction; and FID (FMNIST classifier features, DDIM 10 uniform steps) at
`--fid-widths`. Writes benchmarks/results/quant_reconstruction_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import provenance, write_json
from benchmarks.quant_sensitivity import (
    FidCheck,
    error_report,
    make_eps_fn,
    quantized_eps_fn,
)
from tmpq_jax.quant import QuantBits, load_calibration, save_calibration, unet_registry
from tmpq_jax.quant import calibration as qc
from tmpq_jax.quant import reconstruction as rc
from tmpq_jax.quant.calibration_io import read_calibration_meta
from tmpq_jax.sampling import load_model


def get_reconstruction(lm, reg, qp, meta, args):
    """(QParams, meta) at args.recon: loaded if there, else computed and saved."""
    cands = meta["candidates"]
    fits_file = Path(args.recon) / "fits.json"  # per-fit objectives, for the record
    if (Path(args.recon) / "calibration.json").is_file():
        print(f"reusing {args.recon}")
        q, m = load_calibration(args.recon, reg, cands, meta["model_fingerprint"])
        if fits_file.is_file():
            m |= json.loads(fits_file.read_text())
        return q, m
    s = meta["settings"]
    key = jax.random.key(s["seed"])
    xs, ts = qc.calibration_set(
        lm, jax.random.fold_in(key, 0), s["num_timesteps"], s["num_samples"]
    )
    new, info = rc.reconstruct(
        lm.model,
        lm.params,
        reg,
        qp,
        xs,
        ts,
        jax.random.fold_in(key, 2),
        steps=args.steps,
        progress=True,
    )
    kept = sum(r["kept"] == rc.STAGE_RECONSTRUCTION for r in info["fits"])
    settings = dict(s) | {
        "stage": rc.STAGE_RECONSTRUCTION,
        "reconstruct": {
            k: info[k] for k in ("steps", "lr", "batch_size", "depth", "num_pairs")
        }
        | {"fits": len(info["fits"]), "fits_improved": kept},
    }
    save_calibration(args.recon, new, reg, cands, settings, meta["model_fingerprint"])
    print(f"reconstruction: {kept}/{len(info['fits'])} fits improved, "
          f"{info['seconds']:.0f} s; wrote {args.recon}")  # fmt: skip
    extra = {"fits": info["fits"], "seconds": info["seconds"]}
    fits_file.write_text(json.dumps(extra, indent=1))
    return new, read_calibration_meta(args.recon) | extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/fmnist_unet")
    ap.add_argument("--min-mse", default="checkpoints/fmnist_unet_calib")
    ap.add_argument("--recon", default="runs/calib_recon")
    ap.add_argument("--steps", type=int, default=rc.DEFAULT_STEPS)
    ap.add_argument("--timesteps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234, help="held-out set key")
    ap.add_argument("--fid-samples", type=int, default=2000, help="0: skip FID")
    ap.add_argument("--fid-batch", type=int, default=500)
    ap.add_argument(
        "--fid-widths",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[8, 6],
    )
    args = ap.parse_args()

    lm = load_model(args.checkpoint)
    reg = unet_registry(lm.config)
    meta = read_calibration_meta(args.min_mse)
    cands = tuple(meta["candidates"])
    qp, meta = load_calibration(args.min_mse, reg, cands, None)
    if meta["settings"].get("seed") == args.seed:
        raise SystemExit("the held-out key must differ from the calibration's")
    t0 = time.perf_counter()
    recon, rmeta = get_reconstruction(lm, reg, qp, meta, args)
    recon_s = time.perf_counter() - t0

    xs, ts = qc.calibration_set(
        lm, jax.random.key(args.seed), args.timesteps, args.samples
    )
    xs = xs.reshape(args.timesteps, args.samples, *xs.shape[1:])
    ts = ts.reshape(args.timesteps, args.samples)
    fp = jax.jit(
        lambda x, t: jax.lax.map(
            lambda a: lm.model.apply({"params": lm.params}, a[0], a[1]), (x, t)
        )
    )(xs, ts)
    ones = jnp.ones((len(reg),), jnp.int32)
    runs = {
        "min-mse": make_eps_fn(lm, reg, qp),
        "reconstruction": make_eps_fn(lm, reg, recon),
    }
    eps_rows = []
    for b in qp.bit_widths:
        bits = QuantBits.uniform(reg, b, b)
        for stage, fn in runs.items():
            r = error_report(fn(xs, ts, bits, ones), fp, ts, lm.sched)
            eps_rows.append({"config": f"W{b}A{b}", "stage": stage, **r})
            print(
                f"W{b}A{b} {stage:14s} rel_eps={r['rel_eps']:.4f} "
                f"(t>0: {r['rel_eps_t_gt_0']:.4f}) step={r['step_rms_gray_levels']:.3f}",
                flush=True,
            )

    fid_rows = []
    if args.fid_samples:
        check = FidCheck(lm, args.fid_samples, args.fid_batch)
        fid_rows.append(check.run("float", lm.eps_fn(lm.params), 0, is_float=True))
        for b in args.fid_widths:
            bits = QuantBits.uniform(reg, b, b)
            for stage, q in (("min-mse", qp), ("reconstruction", recon)):
                eps_fn = quantized_eps_fn(lm, reg, bits, q)
                fid_rows.append(check.run(f"W{b}A{b} {stage}", eps_fn, 0))

    fits = rmeta.get("fits")
    payload = {
        **provenance(),
        "what": "block reconstruction (learned step sizes, STE) vs min-MSE: "
        "relative eps error per width on held-out x_t, and FID",
        "checkpoint": args.checkpoint,
        "min_mse_calibration": args.min_mse,
        "reconstruction": args.recon,
        "reconstruction_settings": rmeta["settings"],
        "reconstruction_wall_s": round(rmeta.get("seconds", recon_s), 1),
        "held_out": {
            "timesteps": [int(t) for t in np.asarray(ts[:, 0])],
            "samples_per_timestep": args.samples,
            "seed": args.seed,
        },
        "block_fits": fits,
        "eps": eps_rows,
        "fid": fid_rows,
    }
    name = f"quant_reconstruction_{jax.devices()[0].platform}.json"
    print(write_json(name, payload))


if __name__ == "__main__":
    main()
