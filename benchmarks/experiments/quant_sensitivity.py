"""How far the quantized eps is from full precision: uniform widths, per layer, per t.

  python -m benchmarks.experiments.quant_sensitivity [--checkpoint DIR] [--calib DIR]
      [--timesteps 20 --samples 8 --seed 1234] [--fid-samples 2000 (0: none)]
      [--fid-float-seeds 0,1,2] [--fid-configs 3] [--no-layers]

On a held-out set of (x_t, t) from the float model's own DDIM (eta 0) trajectories,
drawn with a key other than the calibration's (`calibration.calibration_set`):

* uniform W8A8, W7A7, W6A6, W5A5 and W4A8, dynamic (absmax) vs calibrated ranges: the
  relative eps error ||eps_q - eps_fp|| / ||eps_fp||, overall, per timestep and
  without t = 0, and what it does to the sampler: the error of one DDIM (eta 0)
  step t -> t_prev of the held-out schedule, d x_prev = c d eps with
  c = sqrt(1 - ab_prev) - sqrt(ab_prev / ab_t) sqrt(1 - ab_t) (|c| ~ 0.01 at t = 0),
  in gray levels of the [-1, 1] image range (1 level = 2/255);
* per layer (calibrated): only layer i quantized, the others in float, at W8A8 and
  W5A5 ("only"), and W8A8 everywhere except layer i in float ("all but"). "only"
  isolates a layer's own contribution without the others' errors masking it;
  "all but" confirms a culprit (removing it must remove most of the W8A8 error).
  Every configuration runs through one jitted function (bits and the per-layer
  on/off mask are traced arrays);
* an FID check (FMNIST classifier features): DDIM 10 uniform steps, `--fid-samples`
  samples, float at several seeds (FID's own seed noise), then W8A8 calibrated,
  dynamic, and calibrated with `conv_in` in float, on the first seed's noises;
  each against the test set and against the float samples (image difference,
  class agreement, FID between the sample sets).

Writes benchmarks/results/quant_sensitivity_cpu.json (or _<platform>.json).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import provenance, write_json
from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.quant import QParams, QuantBits, load_calibration, supernet, unet_registry
from tmpq_jax.quant import calibration as qc
from tmpq_jax.quant.calibration_io import read_calibration_meta
from tmpq_jax.quant.intercept import intercept
from tmpq_jax.sampling import load_model

UNIFORM = ((8, 8), (7, 7), (6, 6), (5, 5), (4, 8))
GRAY_LEVEL = 2.0 / 255.0


# ----------------------------------------------------------------------------
# One jitted function for every configuration: bits and a layer mask, traced.


def masked_handler(mask, bits, registry, qparams):
    """The supernet's op handler, but layer i runs in float where mask[i] is 0
    (both paths are computed and selected with `where`: the mask stays traced)."""
    quant = supernet.make_handler(bits, registry, qparams)

    def handler(call):
        i = registry.index_of_site(call.site)
        yq = quant(call)
        return yq if i is None else jnp.where(mask[i] > 0, yq, call.original())

    return handler


def make_eps_fn(lm, registry, qparams: QParams | None):
    """Jitted (xs [N, S, ...], ts [N, S], bits, mask) -> eps [N, S, ...]: each of
    the N groups (one t each, as in a sampler's batch) is one forward pass."""
    variables = {"params": lm.params}

    def one(x, t, bits, mask):
        with intercept(masked_handler(mask, bits, registry, qparams)):
            return lm.model.apply(variables, x, t)

    @jax.jit
    def fn(xs, ts, bits, mask):
        return jax.lax.map(lambda xt: one(xt[0], xt[1], bits, mask), (xs, ts))

    return fn


# ----------------------------------------------------------------------------
# Metrics.


def error_report(eps_q, eps_fp, xs_t, sched) -> dict:
    """Relative eps error overall, per t and without t = 0; the DDIM step error
    (t -> the next held-out timestep; t = 0 -> clean) in gray levels."""
    t = np.asarray(xs_t[:, 0])
    d = np.asarray(eps_q - eps_fp, np.float64).reshape(len(t), -1)
    r = np.asarray(eps_fp, np.float64).reshape(len(t), -1)
    ab = np.asarray(sched.alphas_cumprod)[t]
    ab_prev = np.append(ab[1:], 1.0)  # the held-out schedule runs from large t down
    c = np.sqrt(1.0 - ab_prev) - np.sqrt(ab_prev / ab) * np.sqrt(1.0 - ab)
    sq_d, sq_r = (d**2).sum(1), (r**2).sum(1)
    per_t = np.sqrt(sq_d / sq_r)
    step_rms = np.abs(c) * np.sqrt((d**2).mean(1)) / GRAY_LEVEL
    nz = t > 0
    return {
        "rel_eps": float(np.sqrt(sq_d.sum() / sq_r.sum())),
        "rel_eps_t_gt_0": float(np.sqrt(sq_d[nz].sum() / sq_r[nz].sum())),
        "step_rms_gray_levels": float(np.sqrt(np.mean(step_rms**2))),
        "rel_eps_per_t": [round(float(v), 5) for v in per_t],
        "step_rms_gray_levels_per_t": [round(float(v), 4) for v in step_rms],
    }


# ----------------------------------------------------------------------------
# Calibrated results for a width the stored calibration lacks (W4 of W4A8).


def with_weight_width(qparams: QParams, lm, registry, width: int) -> QParams:
    """`qparams` plus `width` for the weights (min-MSE clip search, as `tmpq
    calibrate` does). Its activation column copies the narrowest stored one; only
    weight genes may use it (W4A8: the MatMul operands stay at 8 bits)."""
    if width in qparams.bit_widths:
        return qparams
    clips = []
    for layer, clip in zip(registry, qparams.w_clip, strict=True):
        if clip is None:
            clips.append(None)
            continue
        new, _ = qc.search_weight_clip(qc._kernel(lm.params, layer.path), (width,))
        clips.append(jnp.concatenate([clip, jnp.asarray(new)], axis=0))
    narrow = int(np.argmin(qparams.bit_widths))
    act = jnp.concatenate(
        [qparams.act_bound, qparams.act_bound[..., narrow : narrow + 1]], -1
    )
    return QParams((*qparams.bit_widths, width), act, tuple(clips))


# ----------------------------------------------------------------------------
# The FID check.


def sample_images(lm, eps_fn, num, steps, schedule, seed, batch):
    """Like `tmpq_jax.sampling.sample` (same noises per batch), for any eps_fn."""
    ts = jnp.asarray(
        timestep_schedule(schedule, steps, lm.diffusion.num_timesteps), jnp.int32
    )

    @jax.jit
    def one(key):
        k_x, k_s = jax.random.split(key)
        return ddim_sample(k_s, eps_fn, lm.noise(k_x, batch), ts, lm.sched, 0.0)

    key = jax.random.key(seed)
    out = [np.asarray(one(jax.random.fold_in(key, i))) for i in range(-(-num // batch))]
    return np.clip(np.concatenate(out)[:num], -1.0, 1.0)


def quantized_eps_fn(lm, registry, bits, qparams, mask=None):
    """eps_fn of the quantized model (`quantized_apply`); where `mask[i]` is 0,
    layer i runs in float."""
    variables = {"params": lm.params}
    if mask is None:
        mask = jnp.ones((len(registry),), jnp.int32)

    def eps_fn(x, t):
        with intercept(masked_handler(mask, bits, registry, qparams)):
            return lm.model.apply(variables, x, t)

    return eps_fn


class FidCheck:
    """Samples (DDIM 10 uniform steps, the same noises for a given seed) and scores
    them: FID/KID/IS against the test set, plus, against the float model's samples,
    the image difference (same seed), the class agreement and the FID between the
    two sample sets (to every float seed: the float-vs-float values are the noise
    level of that comparison)."""

    def __init__(self, lm, num: int, batch: int, steps: int = 10):
        from tmpq_jax.evaluation import Evaluator

        self.ev, self.lm, self.num, self.batch, self.steps = (
            Evaluator(),
            lm,
            num,
            batch,
            steps,
        )
        self.float_runs: dict[int, tuple] = {}  # seed -> (imgs, feats, classes)

    def _stats(self, imgs):
        ext = self.ev.net.extract(imgs)
        feats = np.asarray(ext.features)
        return feats, np.asarray(ext.logits).argmax(-1)

    def run(self, name: str, eps_fn, seed: int = 0, is_float: bool = False) -> dict:
        from tmpq_jax.metrics.fid import fid, gaussian_stats

        t0 = time.perf_counter()
        imgs = sample_images(
            self.lm, eps_fn, self.num, self.steps, "uniform", seed, self.batch
        )
        r = self.ev.score(imgs)
        feats, classes = self._stats(imgs)
        row = {
            "config": name,
            "steps": self.steps,
            "schedule": "uniform",
            "seed": seed,
            **{k: r[k] for k in ("num_samples", "fid", "kid", "is")},
            "min_class_fraction": r["min_class_fraction"],
            "mean_gray": float(np.mean((imgs + 1.0) / GRAY_LEVEL)),
            "background_fraction": float(np.mean(imgs <= -0.99)),
        }
        if seed in self.float_runs and not is_float:
            ref_imgs, _, ref_classes = self.float_runs[seed]
            d = (imgs - ref_imgs) / GRAY_LEVEL
            row |= {
                "vs_float_same_noise": {
                    "rms_diff_gray": float(np.sqrt(np.mean(d**2))),
                    "mean_diff_gray": float(np.mean(d)),
                    "class_agreement": float(np.mean(classes == ref_classes)),
                }
            }
        row["fid_to_float_samples"] = {
            f"seed {s}": fid(feats, *map(np.asarray, gaussian_stats(jnp.asarray(f))))
            for s, (_, f, _) in self.float_runs.items()
            if not (is_float and s == seed)
        }
        if is_float:
            self.float_runs[seed] = (imgs, feats, classes)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(row, flush=True)
        return row


def fid_check(lm, registry, qparams, args) -> list[dict]:
    check = FidCheck(lm, args.fid_samples, args.fid_batch)
    rows = [
        check.run("float", lm.eps_fn(lm.params), seed, is_float=True)
        for seed in args.fid_float_seeds
    ]
    w8 = QuantBits.uniform(registry, 8, 8)
    first = registry.index("conv_in")
    first_float = jnp.asarray(np.arange(len(registry)) != first, jnp.int32)
    configs = [
        ("W8A8 calibrated", qparams, None),
        ("W8A8 dynamic", None, None),
        ("W8A8 calibrated, conv_in float", qparams, first_float),
    ]
    for name, qp, mask in configs[: args.fid_configs]:
        eps_fn = quantized_eps_fn(lm, registry, w8, qp, mask)
        rows.append(check.run(name, eps_fn, args.fid_float_seeds[0]))
    return rows


# ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/fmnist_unet")
    ap.add_argument("--calib", default="checkpoints/fmnist_unet_calib")
    ap.add_argument("--timesteps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234, help="held-out set key")
    ap.add_argument("--fid-samples", type=int, default=2000, help="0: skip FID")
    ap.add_argument("--fid-batch", type=int, default=500)
    ap.add_argument(
        "--fid-float-seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 1, 2],
        help="float rows (the first seed's noises are the quantized rows' too)",
    )
    ap.add_argument(
        "--fid-configs", type=int, default=3, help="how many quantized FID rows"
    )
    ap.add_argument("--no-layers", action="store_true", help="skip per-layer sweep")
    ap.add_argument("--out", default=None, help="result file name")
    args = ap.parse_args()

    lm = load_model(args.checkpoint)
    reg = unet_registry(lm.config)
    L = len(reg)
    meta = read_calibration_meta(args.calib)
    cands = tuple(meta["candidates"])
    qp, meta = load_calibration(args.calib, reg, cands)
    if meta["settings"].get("seed") == args.seed:
        raise SystemExit("the held-out key must differ from the calibration's")
    qp4 = with_weight_width(qp, lm, reg, 4)
    cands4 = tuple(sorted(set(cands) | {4}, reverse=True))

    t0 = time.perf_counter()
    xs, ts = qc.calibration_set(
        lm, jax.random.key(args.seed), args.timesteps, args.samples
    )
    xs = xs.reshape(args.timesteps, args.samples, *xs.shape[1:])
    ts = ts.reshape(args.timesteps, args.samples)
    eps_fp = jax.jit(
        lambda x, t: jax.lax.map(
            lambda a: lm.model.apply({"params": lm.params}, a[0], a[1]), (x, t)
        )
    )(xs, ts)
    print(f"held-out set {xs.shape} in {time.perf_counter() - t0:.1f} s", flush=True)

    run_cal = make_eps_fn(lm, reg, qp4)
    run_dyn = make_eps_fn(lm, reg, None)
    ones = jnp.ones((L,), jnp.int32)

    def report(fn, bits, mask=ones):
        supernet.check_bits(bits, reg, cands4)
        return error_report(fn(xs, ts, bits, mask), eps_fp, ts, lm.sched)

    uniform = []
    for w, a in UNIFORM:
        bits = QuantBits.uniform(reg, w, a)
        for ranges, fn in (("calibrated", run_cal), ("dynamic", run_dyn)):
            t1 = time.perf_counter()
            r = report(fn, bits)
            uniform.append({"config": f"W{w}A{a}", "ranges": ranges, **r})
            print(
                f"W{w}A{a} {ranges:10s} rel_eps={r['rel_eps']:.4f} "
                f"(t>0: {r['rel_eps_t_gt_0']:.4f}) step={r['step_rms_gray_levels']:.3f} "
                f"gray levels  ({time.perf_counter() - t1:.1f} s)",
                flush=True,
            )

    layers = []
    if not args.no_layers:
        eye = np.eye(L, dtype=np.int32)
        for i, layer in enumerate(reg):
            row = {"layer": layer.name, "kind": layer.kind, "index": i}
            for b in (8, 5):
                r = report(run_cal, QuantBits.uniform(reg, b, b), jnp.asarray(eye[i]))
                row[f"only_W{b}A{b}"] = r
            r = report(run_cal, QuantBits.uniform(reg, 8, 8), jnp.asarray(1 - eye[i]))
            row["all_but_W8A8"] = r
            layers.append(row)
            print(
                f"{i:2d} {layer.name:22s} only8={row['only_W8A8']['rel_eps']:.4f} "
                f"only5={row['only_W5A5']['rel_eps']:.4f} "
                f"(t>0 {row['only_W5A5']['rel_eps_t_gt_0']:.4f}) "
                f"all_but8={r['rel_eps']:.4f}",
                flush=True,
            )

    fid_rows = []
    if args.fid_samples:
        fid_rows = fid_check(lm, reg, qp, args)

    payload = {
        **provenance(),
        "what": "relative eps error of the quantized model vs float on held-out "
        "x_t from the float model's own DDIM trajectories; FID check",
        "checkpoint": args.checkpoint,
        "calibration": args.calib,
        "calibration_settings": meta["settings"],
        "held_out": {
            "timesteps": [int(t) for t in np.asarray(ts[:, 0])],
            "samples_per_timestep": args.samples,
            "seed": args.seed,
        },
        "w4_weights": "W4 clip ratios searched here (min-MSE, as tmpq calibrate)",
        "gray_level": "step errors: RMS of one DDIM step's x_prev error in units "
        "of 2/255 (one 8-bit gray level)",
        "uniform": uniform,
        "per_layer": layers,
        "fid": fid_rows,
    }
    name = args.out or f"quant_sensitivity_{jax.devices()[0].platform}.json"
    print(write_json(name, payload))


if __name__ == "__main__":
    main()
