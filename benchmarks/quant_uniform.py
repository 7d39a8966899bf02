"""The uniform-precision table: FID of uniform WxAy beside full precision.

  python -m benchmarks.quant_uniform [--bits w8a8,w7a7,w6a6,w5a5,w4a8] [--steps 10q,100]
      [--calibrations minmse,minmse_bc,recon,recon_bc] [--methods minmse,gptq,gptaq]
      [--out-dir DIR] [--out NAME]
  python -m benchmarks.quant_uniform --merge PART.json PART.json [--out-dir DIR]

Per step setting (`100`: DDIM 100 uniform steps, `10q`: 10 quad), full precision
and every (bits, calibration), from the noises of `tmpq eval` at the same seed and
batch size, scored by `Evaluator` and against the FP image of the same noise.
Calibrations (`quant.solver.solve`, as `tmpq calibrate`) are kept under `--workdir`
and reused: `minmse`, `minmse_bc` (+ bias correction), `recon` (+ block
reconstruction), `recon_bc` (both); `dynamic` is none (absmax ranges). `--methods`
(`tmpq calibrate --method`: gptq, gptq_seq, gptaq, gptaq_clip) re-rounds the
weights of each min-MSE kind: e.g. `gptaq` rows are labelled `gptaq`,
`gptaq_bc` (`minmse` keeps the plain names). The JSON is
rewritten after every row; parts with their own `--out` are joined by `--merge`.
"""

import argparse
import json
import re
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import RESULTS, add_args, provenance, quant_eps, write_json
from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.errors import UserError
from tmpq_jax.evaluation import FID_NAME, Evaluator
from tmpq_jax.quant import QuantBits, cost, unet_registry
from tmpq_jax.quant import reconstruction as rc
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.quant.calibration_io import load_calibration, save_calibration
from tmpq_jax.quant.solver import METHODS, solve, with_bias_correction
from tmpq_jax.quant.supernet import check_bits, check_candidates
from tmpq_jax.sampling import load_model

NAME = "quant_uniform.json"
# kind: (reconstruction on?, bias correction on?); "dynamic": no calibration
CALIBRATIONS = {"minmse": (False, False), "minmse_bc": (False, True),
                "recon": (True, False), "recon_bc": (True, True), "dynamic": None}  # fmt: skip
SCHEDULES = {"u": "uniform", "q": "quad"}
GRAY_LEVEL = 2.0 / 255.0
CALIB_SEED = 0  # as `tmpq calibrate` (its default --seed)


def parse_bits(spec: str) -> list[tuple[int, int]]:
    out = []
    for s in spec.split(","):
        if not (m := re.fullmatch(r"[wW](\d)[aA](\d)", s.strip())):
            raise SystemExit(f"--bits {s!r}: write widths like w8a8,w4a8")
        out.append((int(m[1]), int(m[2])))
    return out


def parse_steps(spec: str) -> list[tuple[int, str]]:
    """'100' (uniform), '100u', '10q' -> (steps, schedule)."""
    out = []
    for s in spec.split(","):
        if not (m := re.fullmatch(r"(\d+)([uq]?)", s.strip())):
            raise SystemExit(f"--steps {s!r}: write settings like 100,10q")
        out.append((int(m[1]), SCHEDULES[m[2] or "u"]))
    return out


def _solve(lm, reg, cands, path: Path, steps: int, args, method="minmse") -> tuple:
    """(QParams, settings, reused) without bias correction: the calibration at
    `path`, else made there."""
    fp = model_fingerprint(lm.card)
    try:
        qp, meta = load_calibration(path, reg, cands, fp)
        print(f"reusing {path}", flush=True)
        return qp, meta["settings"], True
    except UserError:
        pass
    n_t, n_s = args.calib_timesteps, args.calib_samples
    kw = dict(reconstruct_steps=steps, bias_correction=False, registry=reg)
    kw["method"] = method
    qp, settings, info = solve(lm, CALIB_SEED, cands, n_t, n_s, progress=False, **kw)
    dev = jax.devices()[0].device_kind
    settings |= dict(seconds=round(info["seconds"], 2), device=dev)
    save_calibration(path, qp, reg, cands, settings, fp)
    print(f"{path.name}: {info['seconds']:.1f} s", flush=True)
    return qp, settings, False


def _bias_corrected(lm, reg, qp, settings: dict) -> tuple:
    """`qp` with bias corrections made on its own calibration set (as `solve`
    makes them last), and settings saying so."""
    t0 = time.perf_counter()
    n_t, n_s = settings["num_timesteps"], settings["num_samples"]
    qp = with_bias_correction(lm, qp, settings["seed"], n_t, n_s, registry=reg)
    seconds = time.perf_counter() - t0
    print(f"bias correction: {seconds:.1f} s", flush=True)
    total = round((settings.get("seconds") or 0.0) + seconds, 2)
    extra = dict(bias_correction=True, bias_correction_seconds=round(seconds, 2))
    return qp, settings | extra | {"seconds": total}


def get_calibrations(lm, reg, cands, kinds, args) -> tuple[dict, dict]:
    """({label: QParams | None}, {label: record for the JSON}) per kind x method
    (label: the kind, `minmse` renamed to the method). A `_bc` kind is its base
    kind's calibration (made once) plus bias correction."""
    c = ",".join(map(str, cands))
    tag = f"c{''.join(map(str, cands))}-t{args.calib_timesteps}x{args.calib_samples}"
    qps, records, base = {}, {}, {}
    for kind, method in kinds:
        if kind == "dynamic":
            qps[kind] = None
            records[kind] = {"what": "no calibration: absmax ranges, no clipping"}
            continue
        recon, bc = CALIBRATIONS[kind]
        t0, steps = time.perf_counter(), args.recon_steps if recon else 0
        name = f"{'recon' if recon else method}{steps or ''}-{tag}"
        if name not in base:
            path = Path(args.workdir) / name
            base[name] = _solve(lm, reg, cands, path, steps, args, method)
        qp, settings, reused = base[name]
        if bc:
            qp, settings = _bias_corrected(lm, reg, qp, settings)
        flags = f" --reconstruct --reconstruct-steps {steps}" if steps else ""
        flags += " --bias-correction" if bc else ""
        flags += f" --method {method}" if method != "minmse" else ""
        kind = kind.replace("minmse", method)
        qps[kind] = qp
        records[kind] = {
            "path": str(Path(args.workdir) / name), "reused": reused,
            "candidates": [int(w) for w in c.split(",")],
            "seconds": settings.get("seconds"),
            "wall_s_this_call": round(time.perf_counter() - t0, 2),
            "settings": settings,
            "equivalent": f"tmpq calibrate --candidates {c} --timesteps "
            f"{args.calib_timesteps} --samples {args.calib_samples} "
            f"--seed {CALIB_SEED}{flags} --out DIR",
        }  # fmt: skip
    return qps, records


class Samplers:
    """One compiled program per (steps, FP | quantized | dynamic); bits traced."""

    def __init__(self, lm, reg, cands):
        self.lm, self.compiled, self.compile_s = lm, {}, {}
        ddim = lambda eps, ts, x: ddim_sample(jax.random.key(0), eps, x, ts, lm.sched)
        self._fp = jax.jit(lambda p, ts, x: ddim(lm.eps_fn(p), ts, x))
        quant = lambda p, qp, bits: quant_eps(lm.model, p, bits, reg, qp, cands)
        self._quant = jax.jit(lambda p, q, bits, ts, x: ddim(quant(p, q, bits), ts, x))

    def run(self, ts, noises, bits=None, qparams=None):
        """Images [N, H, W, C] (unclipped, numpy) and the seconds spent sampling."""
        fn, args, name = self._fp, (self.lm.params, ts), "fp"
        if bits is not None:
            fn, args = self._quant, (self.lm.params, qparams, bits, ts)
            name = "dynamic" if qparams is None else "quantized"
            if qparams is not None and qparams.bias_corr is not None:
                name += "+bias_corr"
        # the kind, the number of steps and the arguments' structure (e.g. with or
        # without bias corrections)
        key = (name, ts.shape[0], str(jax.tree.structure((*args, noises[0]))))
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = fn.lower(*args, noises[0]).compile()
            secs = time.perf_counter() - t0
            self.compile_s[f"{name}/{key[1]} steps"] = round(secs, 2)
        t0 = time.perf_counter()
        outs = [self.compiled[key](*args, x) for x in noises]  # dispatched, then read
        return np.concatenate([np.asarray(o) for o in outs]), time.perf_counter() - t0


def make_noises(lm, num: int, batch_size: int, seed: int) -> list:
    """x_T per batch exactly as `sampling.sample` draws them (same seed, batch)."""
    batch, key = min(batch_size, num), jax.random.key(seed)
    split = lambda i: jax.random.split(jax.random.fold_in(key, i))[0]
    return [lm.noise(split(i), batch) for i in range(-(-num // batch))]


def _classes(ev: Evaluator, images) -> np.ndarray:
    return np.asarray(ev.net.extract(images).logits).argmax(-1)


def score(ev: Evaluator, images: np.ndarray, num: int, fp_ref) -> dict:
    images = images[:num]
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    row: dict = {"finite_fraction": float(finite.mean())}
    if not finite.all():  # FID of a broken model is not a number worth printing
        return row | {"num_samples": num, "fid": None, "kid": None}
    images = np.clip(images, -1.0, 1.0)
    row |= ev.score(images)
    if fp_ref is not None:
        d = (images - fp_ref[0]) / GRAY_LEVEL
        row["vs_fp_same_noise"] = {
            "rms_diff_gray": float(np.sqrt(np.mean(d**2))),
            "mean_diff_gray": float(np.mean(d)),
            "class_agreement": float(np.mean(_classes(ev, images) == fp_ref[1])),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="default: the shipped model")
    add_args(ap, num_samples=10_000, batch_size=2000)
    ap.add_argument("--seed", type=int, default=0, help="the sampling noises")
    ap.add_argument("--bits", default="w8a8,w7a7,w6a6,w5a5,w4a8")
    steps_help = "step settings: 100 (uniform), 10q (quad)"
    ap.add_argument("--steps", default="10q,100", help=steps_help)
    ap.add_argument("--calibrations", default="minmse,minmse_bc,recon,recon_bc")
    ap.add_argument("--methods", default="minmse", help="tmpq calibrate --method's")
    ap.add_argument("--candidates", default="8,7,6,5,4", help="widths calibrated")
    add_args(ap, calib_timesteps=20, calib_samples=32, recon_steps=rc.DEFAULT_STEPS)
    ap.add_argument("--workdir", default="runs/quant_uniform")
    ap.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    ap.add_argument("--out", default=NAME, help="result file name")
    ap.add_argument("--merge", nargs="*", help="join part files into --out")
    args = ap.parse_args()
    if args.merge:
        return print(merge(args.merge, args.out_dir, args.out))

    t_start, n = time.perf_counter(), args.num_samples
    bits_list, settings = parse_bits(args.bits), parse_steps(args.steps)
    kinds = [k.strip() for k in args.calibrations.split(",") if k.strip()]
    if bad := [k for k in kinds if k not in CALIBRATIONS]:
        raise SystemExit(f"--calibrations {bad}: use {', '.join(CALIBRATIONS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"--methods {bad}: use {', '.join(METHODS)}")
    # a method re-rounds min-MSE's weights (not reconstruction's); dynamic once
    keep = lambda k, m: m == "minmse" or k.startswith("minmse")
    kinds = [(k, m) for m in methods for k in kinds if keep(k, m)]
    cands = check_candidates([int(c) for c in args.candidates.split(",")])
    if missing := sorted({b for wa in bits_list for b in wa} - set(cands)):
        raise SystemExit(f"--bits need widths {missing}; add them to --candidates")

    lm = load_model(args.checkpoint)
    reg, ev = unet_registry(lm.config), Evaluator()
    ev.check_num_samples(n)
    qps, calib_records = get_calibrations(lm, reg, cands, kinds, args)
    samplers = Samplers(lm, reg, cands)
    noises = make_noises(lm, n, args.batch_size, args.seed)
    macs, fp_size = float(np.sum(reg.macs)), 32.0 * float(np.sum(reg.params))
    rows: list[dict] = []
    header = {
        "metric": FID_NAME,
        "what": "uniform WxAy (every registry layer; MatMul operands at the activation "
        "width, softmax output at 8 bits) vs full precision, DDIM eta 0, the same "
        "noises for every row",
        "model_checkpoint": args.checkpoint or "checkpoints/fmnist_unet",
        "feature_net": ev.net.path, "num_samples": n, "batch_size": args.batch_size,
        "seed": args.seed, "candidates": list(cands), "calibrations": calib_records,
    }  # fmt: skip

    def save() -> Path:
        wall = {"wall_s": round(time.perf_counter() - t_start, 2)}
        payload = {**provenance(), **header, "compile_s": samplers.compile_s, **wall}
        return write_json(args.out, payload | {"rows": rows}, args.out_dir)

    def add(row: dict, ts, t0: float, fp_ref, bits=None, qparams=None) -> dict:
        """Samples and scores one row; appends it, logs it, saves the JSON."""
        images, sample_s = samplers.run(ts, noises, bits, qparams)
        r = score(ev, images, n, fp_ref)
        speed = {"sample_s": round(sample_s, 2), "images_per_s": round(n / sample_s, 1)}
        rows.append(row | r | speed | {"wall_s": round(time.perf_counter() - t0, 2)})
        _log(rows[-1])
        save()
        return images

    for steps, schedule in settings:
        ts = timestep_schedule(schedule, steps, lm.diffusion.num_timesteps)
        ts = jax.numpy.asarray(ts, np.int32)
        at = {"steps": steps, "schedule": schedule, "timesteps": [int(t) for t in ts]}
        fp = dict(config="FP32", w_bits=32, a_bits=32, calibration=None, **at)
        fp |= dict(bitops=32 * 32 * macs * steps, size_bits=fp_size)
        images, fp_ref = add(fp, ts, time.perf_counter(), None), None
        if rows[-1]["fid"] is not None:
            ref = np.clip(images[:n], -1.0, 1.0)
            fp_ref = (ref, _classes(ev, ref))
        for kind in qps:
            for w, a in bits_list:
                t0 = time.perf_counter()
                bits = QuantBits.uniform(reg, w, a)
                check_bits(bits, reg, cands)
                widths = dict(config=f"W{w}A{a}", w_bits=w, a_bits=a)
                row = dict(widths, calibration=kind, **at)
                row["bitops"] = float(cost.total_bitops(bits, reg, steps))
                row["size_bits"] = float(cost.model_size_bits(bits, reg))
                add(row, ts, t0, fp_ref, bits, qps[kind])
    print(save())


def _log(r: dict) -> None:
    fid = "n/a (non-finite samples)" if r["fid"] is None else f"{r['fid']:.3f}"
    what = f"{r['steps']:4d} {r['schedule']:7s} {r['config']:5s} {r['calibration'] or '-':7s}"
    cost_ = f"GBitOPs={r['bitops'] / 1e9:.1f} {r['images_per_s']} img/s"
    print(f"{what} fid={fid} kid={r.get('kid')} {cost_} ({r['wall_s']} s)", flush=True)


def merge(paths: list[str], out_dir: str | None, name: str = NAME) -> Path:
    """One results file from parts: rows in order, each (config, calibration,
    steps, schedule) once (the first part's), calibrations of all parts, each
    with the widths it was made of (parts may calibrate different widths)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for p, path in zip(parts, paths, strict=True):
        for k in ("num_samples", "seed", "batch_size"):
            if p[k] != parts[0][k]:
                raise SystemExit(f"{path}: {k} {p[k]} differs from {parts[0][k]}")
    # a part that is itself a merge brings its own parts' provenance
    prov = [q for p in parts for q in p.get("parts") or [p]]
    rows, calibrations = {}, {}
    for p in parts:
        for r in p["rows"]:
            key = (r["config"], r["calibration"], r["steps"], r["schedule"])
            rows.setdefault(key, r)
        for k, v in p["calibrations"].items():
            v = {"candidates": p["candidates"], **v}
            if k in calibrations and calibrations[k]["candidates"] != v["candidates"]:
                raise SystemExit(
                    f"{k} calibrated at widths {calibrations[k]['candidates']} and "
                    f"{v['candidates']}: merge parts of one calibration's widths only"
                )
            calibrations.setdefault(k, v)
    last = {k: v for k, v in parts[-1].items() if k not in ("wall_s", "compile_s")}
    keys = ("device", "date", "command", "wall_s", "compile_s")
    payload = {
        **last,  # provenance: the last part's; every part's under "parts"
        "candidates": sorted({w for v in calibrations.values() for w in v["candidates"]}, reverse=True),
        "calibrations": calibrations,
        "rows": list(rows.values()),
        "parts": [{k: p[k] for k in keys} for p in prov],
    }
    return write_json(name, payload, out_dir or RESULTS)


if __name__ == "__main__":
    main()
