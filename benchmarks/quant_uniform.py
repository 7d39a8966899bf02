"""The uniform-precision table: FID of uniform WxAy beside full precision.

  python -m benchmarks.quant_uniform [--num-samples 10000] [--batch-size 2000]
      [--bits w8a8,w7a7,w6a6,w5a5,w4a8] [--steps 10q,100]
      [--calibrations minmse,minmse_bc,recon,recon_bc] [--candidates 8,7,6,5,4]
      [--workdir runs/quant_uniform] [--recon-steps 300] [--out-dir DIR] [--out NAME]
  python -m benchmarks.quant_uniform --merge PART.json PART.json [--out-dir DIR]

Rows: for every step setting (`100`: DDIM 100 uniform steps, `10q`: 10 quad steps;
`Nu`/`Nq` in general) full precision, then every (bits, calibration). Every row
samples `--num-samples` images from the same noises (those of `tmpq eval` /
`benchmarks.fp_baseline` at the same seed and batch size, so the FP rows repeat
that table's) and scores them with `tmpq_jax.evaluation.Evaluator`: FID, KID (std
over subsets), IS, class histogram, plus the RMS image difference to the FP
samples of the same noise (gray levels) and the class agreement with them.

Calibrations, once per kind for the whole candidate set (`--candidates`, which
must hold every width in `--bits`), made by `tmpq_jax.quant.solver.solve` (what
`tmpq calibrate` runs; seed 0, 20 timesteps x 32 samples), kept under `--workdir`
and reused by a later call: `minmse` (min-MSE ranges only), `minmse_bc` (then
bias correction), `recon` (min-MSE, then block reconstruction), `recon_bc`
(then bias correction); `dynamic` (not by default) is no calibration: absmax
ranges, no weight clipping. W4A8 takes the 4-bit weight and the 8-bit activation
results of the same calibration (reconstruction fits each width for a whole
block, WkAk; bias correction is stored for every (w, a) pair).

One sampler is compiled per step setting for all the quantized rows (the bits and
the calibration's arrays are traced arguments), one for FP. The JSON is rewritten
after every row, so a run cut short keeps what it finished. Split a long table
over calls (e.g. `--calibrations minmse`, then `--calibrations recon_bc`, each with
its own `--out`) and join the parts with `--merge` (FP rows are kept once).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import RESULTS, provenance, write_json
from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.errors import UserError
from tmpq_jax.evaluation import FID_NAME, Evaluator
from tmpq_jax.quant import QuantBits, cost, unet_registry
from tmpq_jax.quant import reconstruction as rc
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.quant.calibration_io import load_calibration, save_calibration
from tmpq_jax.quant.solver import solve, with_bias_correction
from tmpq_jax.quant.supernet import check_bits, check_candidates, quantized_apply
from tmpq_jax.sampling import load_model

NAME = "quant_uniform.json"
# kind: (reconstruction on?, bias correction on?); "dynamic": no calibration
CALIBRATIONS = {
    "minmse": (False, False),
    "minmse_bc": (False, True),
    "recon": (True, False),
    "recon_bc": (True, True),
    "dynamic": None,
}
SCHEDULES = {"u": "uniform", "q": "quad"}
GRAY_LEVEL = 2.0 / 255.0
CALIB_SEED = 0  # as `tmpq calibrate` (its default --seed)


# ----------------------------------------------------------------------------
# Arguments.


def parse_bits(spec: str) -> list[tuple[int, int]]:
    out = []
    for s in spec.split(","):
        m = re.fullmatch(r"[wW](\d)[aA](\d)", s.strip())
        if not m:
            raise SystemExit(f"--bits {s!r}: write widths like w8a8,w4a8")
        out.append((int(m[1]), int(m[2])))
    return out


def parse_steps(spec: str) -> list[tuple[int, str]]:
    """'100' (uniform), '100u', '10q' -> (steps, schedule)."""
    out = []
    for s in spec.split(","):
        m = re.fullmatch(r"(\d+)([uq]?)", s.strip())
        if not m:
            raise SystemExit(f"--steps {s!r}: write settings like 100,10q")
        out.append((int(m[1]), SCHEDULES[m[2] or "u"]))
    return out


# ----------------------------------------------------------------------------
# Calibrations (kept in the workdir, reused when there).


def _solve(lm, reg, cands, path: Path, steps: int, args) -> tuple:
    """(QParams, settings, reused) without bias correction: the calibration at
    `path`, else made there."""
    fp = model_fingerprint(lm.card)
    try:
        qp, meta = load_calibration(path, reg, cands, fp)
        print(f"reusing {path}", flush=True)
        return qp, meta["settings"], True
    except UserError:
        pass
    qp, settings, info = solve(
        lm,
        CALIB_SEED,
        cands,
        args.calib_timesteps,
        args.calib_samples,
        reconstruct_steps=steps,
        bias_correction=False,
        registry=reg,
        progress=False,
    )
    settings |= {
        "seconds": round(info["seconds"], 2),
        "device": jax.devices()[0].device_kind,
    }
    save_calibration(path, qp, reg, cands, settings, fp)
    print(f"{path.name}: {info['seconds']:.1f} s", flush=True)
    return qp, settings, False


def _bias_corrected(lm, reg, qp, settings: dict) -> tuple:
    """`qp` with bias corrections made on its own calibration set (as `solve`
    makes them last), and settings saying so."""
    t0 = time.perf_counter()
    qp = with_bias_correction(
        lm,
        qp,
        settings["seed"],
        settings["num_timesteps"],
        settings["num_samples"],
        registry=reg,
    )
    seconds = time.perf_counter() - t0
    print(f"bias correction: {seconds:.1f} s", flush=True)
    settings = settings | {
        "bias_correction": True,
        "bias_correction_seconds": round(seconds, 2),
        "seconds": round((settings.get("seconds") or 0.0) + seconds, 2),
    }
    return qp, settings


def get_calibrations(lm, reg, cands, kinds, args) -> tuple[dict, dict]:
    """({kind: QParams | None}, {kind: record for the JSON}). A `_bc` kind is its
    base kind's calibration (made once) plus bias correction."""
    tag = f"c{''.join(map(str, cands))}-t{args.calib_timesteps}x{args.calib_samples}"
    qps, records, base = {}, {}, {}
    for kind in kinds:
        if kind == "dynamic":
            qps[kind] = None
            records[kind] = {"what": "no calibration: absmax ranges, no clipping"}
            continue
        recon, bc = CALIBRATIONS[kind]
        steps = args.recon_steps if recon else 0
        name = f"{'recon' if recon else 'minmse'}{steps or ''}-{tag}"
        t0 = time.perf_counter()
        if name not in base:
            base[name] = _solve(lm, reg, cands, Path(args.workdir) / name, steps, args)
        qp, settings, reused = base[name]
        if bc:
            qp, settings = _bias_corrected(lm, reg, qp, settings)
        flags = f" --reconstruct --reconstruct-steps {steps}" if steps else ""
        flags += " --bias-correction" if bc else ""
        qps[kind] = qp
        records[kind] = {
            "path": str(Path(args.workdir) / name),
            "reused": reused,
            "seconds": settings.get("seconds"),
            "wall_s_this_call": round(time.perf_counter() - t0, 2),
            "settings": settings,
            "equivalent": f"tmpq calibrate --candidates {','.join(map(str, cands))} "
            f"--timesteps {args.calib_timesteps} --samples {args.calib_samples} "
            f"--seed {CALIB_SEED}{flags} --out DIR",
        }
    return qps, records


# ----------------------------------------------------------------------------
# Sampling: one compiled program per (step setting, FP | quantized | dynamic).


class Samplers:
    def __init__(self, lm, reg, cands):
        self.lm, self.reg, self.cands = lm, reg, cands
        self.compiled: dict = {}
        self.compile_s: dict = {}

        def fp(params, ts, x):
            return ddim_sample(jax.random.key(0), lm.eps_fn(params), x, ts, lm.sched)

        def quant(params, qparams, bits, ts, x):
            def eps_fn(x, t):
                return quantized_apply(
                    lm.model,
                    {"params": params},
                    x,
                    t,
                    bits=bits,
                    registry=reg,
                    qparams=qparams,
                    candidates=cands,
                )

            return ddim_sample(jax.random.key(0), eps_fn, x, ts, lm.sched)

        self._fp, self._quant = jax.jit(fp), jax.jit(quant)

    def _get(self, name: str, fn, args):
        # kind, number of steps, and the arguments' structure (e.g. with or
        # without bias corrections)
        key = (name, args[-2].shape[0], str(jax.tree.structure(args)))
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = fn.lower(*args).compile()
            self.compile_s[f"{name}/{key[1]} steps"] = round(
                time.perf_counter() - t0, 2
            )
        return self.compiled[key]

    def run(self, ts, noises, bits=None, qparams=None):
        """Images [N, H, W, C] (unclipped, numpy) and the seconds spent sampling."""
        p = self.lm.params
        if bits is None:
            args = (p, ts)
            fn = self._get("fp", self._fp, (*args, noises[0]))
        else:
            args = (p, qparams, bits, ts)
            name = "dynamic" if qparams is None else "quantized"
            if qparams is not None and qparams.bias_corr is not None:
                name += "+bias_corr"
            fn = self._get(name, self._quant, (*args, noises[0]))
        t0 = time.perf_counter()
        outs = [fn(*args, x) for x in noises]  # all dispatched, then fetched
        images = np.concatenate([np.asarray(o) for o in outs])
        return images, time.perf_counter() - t0


def make_noises(lm, num: int, batch_size: int, seed: int) -> list:
    """x_T per batch exactly as `sampling.sample` draws them (same seed, batch)."""
    batch = min(batch_size, num)
    key = jax.random.key(seed)
    return [
        lm.noise(jax.random.split(jax.random.fold_in(key, i))[0], batch)
        for i in range(-(-num // batch))
    ]


# ----------------------------------------------------------------------------
# Scoring.


def score(ev: Evaluator, images: np.ndarray, num: int, fp_ref) -> dict:
    images = images[:num]
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    row: dict = {"finite_fraction": float(finite.mean())}
    if not finite.all():  # FID of a broken model is not a number worth printing
        return row | {"num_samples": num, "fid": None, "kid": None}
    images = np.clip(images, -1.0, 1.0)
    row |= ev.score(images)
    if fp_ref is not None:
        ref_images, ref_classes = fp_ref
        d = (images - ref_images) / GRAY_LEVEL
        classes = np.asarray(ev.net.extract(images).logits).argmax(-1)
        row["vs_fp_same_noise"] = {
            "rms_diff_gray": float(np.sqrt(np.mean(d**2))),
            "mean_diff_gray": float(np.mean(d)),
            "class_agreement": float(np.mean(classes == ref_classes)),
        }
    return row


# ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="default: the shipped model")
    ap.add_argument("--num-samples", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="the sampling noises")
    ap.add_argument("--bits", default="w8a8,w7a7,w6a6,w5a5,w4a8")
    ap.add_argument(
        "--steps", default="10q,100", help="step settings: 100 (uniform), 10q (quad)"
    )
    ap.add_argument("--calibrations", default="minmse,minmse_bc,recon,recon_bc")
    ap.add_argument("--candidates", default="8,7,6,5,4", help="widths calibrated")
    ap.add_argument("--calib-timesteps", type=int, default=20)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--recon-steps", type=int, default=rc.DEFAULT_STEPS)
    ap.add_argument("--workdir", default="runs/quant_uniform")
    ap.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    ap.add_argument("--out", default=NAME, help="result file name")
    ap.add_argument("--merge", nargs="*", help="join part files into --out")
    args = ap.parse_args()
    if args.merge:
        print(merge(args.merge, args.out_dir, args.out))
        return

    t_start = time.perf_counter()
    bits_list = parse_bits(args.bits)
    settings = parse_steps(args.steps)
    kinds = [k.strip() for k in args.calibrations.split(",") if k.strip()]
    if bad := [k for k in kinds if k not in CALIBRATIONS]:
        raise SystemExit(f"--calibrations {bad}: use {', '.join(CALIBRATIONS)}")
    cands = check_candidates([int(c) for c in args.candidates.split(",")])
    if missing := sorted({b for wa in bits_list for b in wa} - set(cands)):
        raise SystemExit(f"--bits need widths {missing}; add them to --candidates")

    lm = load_model(args.checkpoint)
    reg = unet_registry(lm.config)
    ev = Evaluator()
    ev.check_num_samples(args.num_samples)
    qps, calib_records = get_calibrations(lm, reg, cands, kinds, args)
    samplers = Samplers(lm, reg, cands)
    noises = make_noises(lm, args.num_samples, args.batch_size, args.seed)
    macs = float(np.sum(reg.macs))
    fp_size = 32.0 * float(np.sum(reg.params))

    rows: list[dict] = []
    header = {
        "metric": FID_NAME,
        "what": "uniform WxAy (every registry layer; MatMul operands at the "
        "activation width, softmax output at 8 bits) vs full precision, DDIM "
        "eta 0, the same noises for every row",
        "model_checkpoint": args.checkpoint or "checkpoints/fmnist_unet",
        "feature_net": ev.net.path,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "candidates": list(cands),
        "calibrations": calib_records,
    }

    def save() -> Path:
        payload = {
            **provenance(),
            **header,
            "compile_s": samplers.compile_s,
            "wall_s": round(time.perf_counter() - t_start, 2),
            "rows": rows,
        }
        return write_json(args.out, payload, args.out_dir)

    for steps, schedule in settings:
        ts = jax.numpy.asarray(
            timestep_schedule(schedule, steps, lm.diffusion.num_timesteps), np.int32
        )
        common = {
            "steps": steps,
            "schedule": schedule,
            "timesteps": [int(t) for t in ts],
        }
        t0 = time.perf_counter()
        images, sample_s = samplers.run(ts, noises)
        r = score(ev, images, args.num_samples, None)
        fp_ref = None
        if r["fid"] is not None:
            ref = np.clip(images[: args.num_samples], -1.0, 1.0)
            fp_ref = (ref, np.asarray(ev.net.extract(ref).logits).argmax(-1))
        rows.append(
            {
                "config": "FP32",
                "w_bits": 32,
                "a_bits": 32,
                "calibration": None,
                **common,
                "bitops": 32 * 32 * macs * steps,
                "size_bits": fp_size,
                **r,
                "sample_s": round(sample_s, 2),
                "images_per_s": round(args.num_samples / sample_s, 1),
                "wall_s": round(time.perf_counter() - t0, 2),
            }
        )
        _log(rows[-1])
        save()
        for kind in kinds:
            for w, a in bits_list:
                t0 = time.perf_counter()
                bits = QuantBits.uniform(reg, w, a)
                check_bits(bits, reg, cands)
                images, sample_s = samplers.run(ts, noises, bits, qps[kind])
                r = score(ev, images, args.num_samples, fp_ref)
                rows.append(
                    {
                        "config": f"W{w}A{a}",
                        "w_bits": w,
                        "a_bits": a,
                        "calibration": kind,
                        **common,
                        "bitops": float(cost.total_bitops(bits, reg, steps)),
                        "size_bits": float(cost.model_size_bits(bits, reg)),
                        **r,
                        "sample_s": round(sample_s, 2),
                        "images_per_s": round(args.num_samples / sample_s, 1),
                        "wall_s": round(time.perf_counter() - t0, 2),
                    }
                )
                _log(rows[-1])
                save()
    print(save())


def _log(r: dict) -> None:
    fid = "n/a (non-finite samples)" if r["fid"] is None else f"{r['fid']:.3f}"
    print(
        f"{r['steps']:4d} {r['schedule']:7s} {r['config']:5s} "
        f"{r['calibration'] or '-':7s} fid={fid} kid={r.get('kid')} "
        f"GBitOPs={r['bitops'] / 1e9:.1f} {r['images_per_s']} img/s "
        f"({r['wall_s']} s)",
        flush=True,
    )


def _row_key(r: dict) -> tuple:
    return (r["config"], r["calibration"], r["steps"], r["schedule"])


def merge(paths: list[str], out_dir: str | None, name: str = NAME) -> Path:
    """One results file from parts: rows in order, each (config, calibration,
    steps, schedule) once (the first part's), calibrations of all parts."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for p, path in zip(parts, paths, strict=True):
        for k in ("num_samples", "seed", "batch_size", "candidates"):
            if p[k] != parts[0][k]:
                raise SystemExit(f"{path}: {k} {p[k]} differs from {parts[0][k]}")
    # a part that is itself a merge brings its own parts' provenance
    prov = [q for p in parts for q in p.get("parts") or [p]]
    rows, seen = [], set()
    for p in parts:
        for r in p["rows"]:
            if _row_key(r) not in seen:
                seen.add(_row_key(r))
                rows.append(r)
    calibrations: dict = {}
    for p in parts:
        for k, v in p["calibrations"].items():
            calibrations.setdefault(k, v)
    last = {k: v for k, v in parts[-1].items() if k not in ("wall_s", "compile_s")}
    payload = {
        **last,  # provenance: the last part's; every part's under "parts"
        "calibrations": calibrations,
        "rows": rows,
        "parts": [
            {k: p[k] for k in ("device", "date", "command", "wall_s", "compile_s")}
            for p in prov
        ],
    }
    return write_json(name, payload, out_dir or RESULTS)


if __name__ == "__main__":
    main()
