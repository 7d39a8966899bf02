"""Seconds of `tmpq calibrate --method M` on the shipped UNet, the committed code
(`git show HEAD:`, loaded as temp modules) against the working tree, in one run:
min-MSE once, then each method's GPTQ stage (`solver.with_method`) both ways.

    python -m benchmarks.experiments.calibrate_speed --methods gptq,gptaq \
        --timesteps 4 --samples 8

Writes benchmarks/results/calibrate_speed_cpu.json; `--old-ref REF` picks the
commit to compare with; `same_weights` says whether both stored the same weights.
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import REPO, provenance, write_json
from tmpq_jax.quant import gptq, gptq_seq
from tmpq_jax.quant.calibration import calibrate, calibration_set
from tmpq_jax.quant.solver import CLIP_GRID
from tmpq_jax.user_model import resolve_model


def _old_modules(ref: str, tmp: Path):
    """(gptq, gptq_seq) as they were at `ref`, gptq_seq importing that gptq."""
    mods = []
    for name in ("gptq", "gptq_seq"):
        src = subprocess.check_output(
            ["git", "show", f"{ref}:tmpq_jax/quant/{name}.py"], cwd=REPO, text=True
        ).replace("from tmpq_jax.quant.gptq import", "from _old_gptq import")
        path = tmp / f"_old_{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"_old_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def _run(mods, method, lm, reg, qp, key, args):
    """(seconds, stored kernels) of `method`'s stage with modules (gptq, gptq_seq)."""
    xs, ts, *extra = calibration_set(
        lm, jax.random.fold_in(key, 0), args.timesteps, args.samples
    )
    k3, t0 = jax.random.fold_in(key, 3), time.perf_counter()
    if method == "gptq":
        out, _ = mods[0].gptq_qparams(lm.model, lm.params, reg, qp, xs, ts, k3,
                                      extra=tuple(extra))  # fmt: skip
    else:
        grid = CLIP_GRID if method == "gptaq_clip" else (1.0,)
        out, _ = mods[1].gptq_seq_qparams(
            lm.model, lm.params, reg, qp, xs, ts, k3, extra=tuple(extra),
            compensate=method != "gptq_seq", grid=grid,
        )  # fmt: skip
    kernels = [np.asarray(k) for k in out.w_kernel if k is not None]
    return time.perf_counter() - t0, kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="gptq,gptaq")
    ap.add_argument("--candidates", default="8,4")
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--old-ref", default="HEAD")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lm = resolve_model(str(REPO / "checkpoints" / "fmnist_unet"), None)
    reg, key = lm.layer_registry(), jax.random.key(0)
    widths = tuple(int(b) for b in args.candidates.split(","))
    t0 = time.perf_counter()
    qp, _ = calibrate(lm, key, widths, args.timesteps, args.samples, False,
                      registry=reg)  # fmt: skip
    rows = {"minmse_seconds": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory() as tmp:
        old = _old_modules(args.old_ref, Path(tmp))
        for m in args.methods.split(","):
            t_old, k_old = _run(old, m, lm, reg, qp, key, args)
            t_new, k_new = _run((gptq, gptq_seq), m, lm, reg, qp, key, args)
            same = all(np.array_equal(a, b) for a, b in zip(k_old, k_new, strict=True))
            rows[m] = {"before_s": round(t_old, 1), "after_s": round(t_new, 1),
                       "speedup": round(t_old / t_new, 2), "same_weights": same}  # fmt: skip
            print(m, rows[m], flush=True)
    payload = provenance() | {
        "setting": {"candidates": widths, "timesteps": args.timesteps,
                    "samples": args.samples, "old_ref": args.old_ref},  # fmt: skip
        "methods": rows,
    }
    write_json("calibrate_speed_cpu.json", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
