"""Full-precision quality of the shipped DiT against steps and guidance scale.

Rows `{steps, guidance, solver, fid, ...}`: FID (FMNIST classifier features,
against the test split) of `--num` class-balanced samples, Euler (or Heun) over
the SD3-shifted time grid, classifier-free guidance at each scale (1.0: the
conditional model alone). One compiled sampler per step count: the guidance
scale is traced. The evaluator's other spaces are recorded where it has them.

    python -m benchmarks.dit_fp --model checkpoints/fmnist_dit
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import provenance, write_json
from tmpq_jax.diffusion.flow import flow_times
from tmpq_jax.diffusion.guidance import balanced_labels, guided_sample
from tmpq_jax.evaluation import Evaluator
from tmpq_jax.models.dit import DiT, gflops_per_image, load_dit
from tmpq_jax.sampling import to_uint8


def sampler(cfg, params, num: int, batch: int, solver: str):
    model = DiT(cfg)

    @jax.jit
    def one(key, times, scale, labels):
        fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
        return guided_sample(
            key, fn, cfg, times, labels=labels, guidance_scale=scale, solver=solver
        )

    def run(key, times, scale):
        labels = balanced_labels(jax.random.fold_in(key, 1), num, cfg.num_classes)
        out = [
            one(jax.random.fold_in(key, s), times, scale, labels[s : s + batch])
            for s in range(0, num, batch)
        ]
        return np.clip(np.concatenate([np.asarray(o) for o in out]), -1.0, 1.0)

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/fmnist_dit")
    p.add_argument("--steps", default="4,10,20,50")
    p.add_argument("--guidance", default="1.0,1.5,2.0,3.0")
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--solver", default="euler")
    p.add_argument("--num", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--data-dir")
    p.add_argument("--out", default="dit_fp.json")
    p.add_argument("--out-dir", help="default: benchmarks/results")
    args = p.parse_args(argv)
    cfg, params, card = load_dit(args.model)
    ev = Evaluator(None, args.data_dir)
    run = sampler(cfg, params, args.num, min(args.batch, args.num), args.solver)
    rows = []
    for steps in map(int, args.steps.split(",")):
        times = jnp.asarray(flow_times(steps, args.shift), jnp.float32)
        for g in map(float, args.guidance.split(",")):
            start = time.perf_counter()
            imgs = to_uint8(run(jax.random.key(0), times, jnp.float32(g)))
            scores = ev.score(imgs)
            row = dict(steps=steps, guidance=g, solver=args.solver, shift=args.shift)
            row.update({k: v for k, v in scores.items() if isinstance(v, float | int)})
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(f"steps {steps:3d} guidance {g:.1f}: FID {row['fid']:.2f}")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    payload = {
        **provenance(),
        "model": args.model,
        "params": n_params,
        "gflop_per_image": gflops_per_image(cfg),
        "training": {
            k: card.get(k) for k in ("steps", "device", "date", "train_wall_s_total")
        },
        "num_samples": args.num,
        "rows": rows,
    }
    print(f"wrote {write_json(args.out, payload, args.out_dir)}")


if __name__ == "__main__":
    main()
