"""Full-precision model facts: size, training provenance, DDIM sampling throughput.

  python -m benchmarks.fp_model [--checkpoint DIR] [--batch 1000] [--steps 100]

Throughput: images/s of a whole `--steps`-step DDIM run (the jitted sampler), fp32
and bf16 compute timed in the same run; absolute numbers mean something on a GPU.
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import add_args, provenance, time_fn, write_json
from tmpq_jax.diffusion.schedules import uniform_timesteps
from tmpq_jax.models.unet import count_params
from tmpq_jax.sampling import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, checkpoint=None, batch=1000, steps=100, repeats=3, out_dir=None)
    args = ap.parse_args()
    lm = load_model(args.checkpoint)
    ts = jnp.asarray(uniform_timesteps(args.steps, lm.diffusion.num_timesteps))
    rows, b = {}, args.batch
    for dtype in ("float32", "bfloat16"):
        m, key = lm.with_dtype(dtype), jax.random.key(0)
        secs = time_fn(m.ddim_batch, m.params, key, ts, b, 0.0, repeats=args.repeats)
        rows[dtype] = dict(images_per_s=b / secs, forwards_per_s=b * args.steps / secs)
        rows[dtype]["seconds_per_batch"] = secs
        print(dtype, rows[dtype])
    card, ips = lm.card, {k: v["images_per_s"] for k, v in rows.items()}
    payload = {
        **provenance(), "model": card["config"]["model"],
        "param_count": count_params(lm.params), "training_steps": card["steps"],
        "training_batch_size": card["config"]["train"]["batch_size"],
        "training_gpu_wall_s": card["train_wall_s_total"],
        "training_device": card["device"],
        "sampling": {"sampler": "DDIM eta=0, uniform schedule", "steps": args.steps,
                     "batch": b, "by_dtype": rows,
                     "bf16_over_fp32": ips["bfloat16"] / ips["float32"]},
    }  # fmt: skip
    print(write_json("fp_model.json", payload, args.out_dir))


if __name__ == "__main__":
    main()
