"""Full-precision model facts: size, training provenance, DDIM sampling throughput.

  python -m benchmarks.fp_model [--checkpoint DIR] [--batch 1000] [--steps 100]

Throughput is images/s of a whole `--steps`-step DDIM run (the jitted sampler),
fp32 and bf16 compute timed in the same run. Absolute numbers mean something only
on the GPU; the JSON records the device.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import provenance, time_fn, write_json
from tmpq_jax.diffusion.schedules import uniform_timesteps
from tmpq_jax.models.unet import count_params
from tmpq_jax.sampling import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()

    lm = load_model(args.checkpoint)
    T = lm.diffusion.num_timesteps
    ts = jnp.asarray(uniform_timesteps(args.steps, T))
    rows = {}
    for dtype in ("float32", "bfloat16"):
        m = lm.with_dtype(dtype)
        secs = time_fn(
            m.ddim_batch,
            m.params,
            jax.random.key(0),
            ts,
            args.batch,
            0.0,
            repeats=args.repeats,
        )
        rows[dtype] = {
            "images_per_s": args.batch / secs,
            "forwards_per_s": args.batch * args.steps / secs,
            "seconds_per_batch": secs,
        }
        print(dtype, rows[dtype])
    card = lm.card
    payload = {
        **provenance(),
        "model": card["config"]["model"],
        "param_count": count_params(lm.params),
        "training_steps": card["steps"],
        "training_batch_size": card["config"]["train"]["batch_size"],
        "training_gpu_wall_s": card["train_wall_s_total"],
        "training_device": card["device"],
        "sampling": {
            "sampler": "DDIM eta=0, uniform schedule",
            "steps": args.steps,
            "batch": args.batch,
            "by_dtype": rows,
            "bf16_over_fp32": rows["bfloat16"]["images_per_s"]
            / rows["float32"]["images_per_s"],
        },
    }
    print(write_json("fp_model.json", payload, args.out_dir))


if __name__ == "__main__":
    main()
