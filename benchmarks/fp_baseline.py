"""The full-precision quality table: FID/KID/IS/class histogram per sampler setting.

  python -m benchmarks.fp_baseline [--num-samples 10000] [--checkpoint DIR]

Rows: DDIM 10 quad, 10 uniform, 20 quad, 20 uniform, 50 and 100 uniform, DDPM 1000;
then the floor (real train subsets of 2000 and 10000 against the test stats, 5
disjoint subsets each). All in FMNIST-classifier feature space.
"""

import argparse
import time

from benchmarks.common import add_args, ints, provenance, write_json
from tmpq_jax.evaluation import FID_NAME, Evaluator, evaluate_model
from tmpq_jax.metrics import fid_floor
from tmpq_jax.sampling import load_model

ROWS = "10:quad,10:uniform,20:quad,20:uniform,50:uniform,100:uniform,1000:ddpm"


def main() -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, num_samples=10_000, batch_size=2000)
    ap.add_argument(
        "--rows", default="all", help="comma list of STEPS:SCHEDULE, or all"
    )
    add_args(ap, floor_sizes="2000,10000", out_dir=None)
    default = "exported model dir (default: the shipped checkpoints/fmnist_unet)"
    ap.add_argument("--checkpoint", default=None, help=default)
    args = ap.parse_args()

    rows = [
        r.split(":") for r in (ROWS if args.rows == "all" else args.rows).split(",")
    ]
    ev, lm, results = Evaluator(), load_model(args.checkpoint), []
    for steps, schedule in [(int(s), sched) for s, sched in rows]:
        t0 = time.perf_counter()
        n, bs = args.num_samples, args.batch_size
        r = evaluate_model(ev, lm, steps, schedule, n, seed=0, batch_size=bs)
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        stats = f"fid={r['fid']:.3f} kid={r['kid']:.5f} is={r['is']:.3f} min_class={r['min_class_fraction']:.3f}"
        print(f"{steps:5d} {schedule:8s} {stats} ({r['wall_s']} s)", flush=True)
        results.append(r)
    sizes = tuple(ints(args.floor_sizes))
    floor = fid_floor(ev.net, ev.stats, subset_sizes=sizes, num_subsets=5)
    print("floor", floor)
    payload = {
        **provenance(), "metric": FID_NAME,
        "model_checkpoint": args.checkpoint or "checkpoints/fmnist_unet",
        "model_card": {k: lm.card[k] for k in ("steps", "params", "device")},
        "feature_net": ev.net.path, "rows": results,
        "floor": [{"num_samples": int(k), **v} for k, v in floor.items()],
    }  # fmt: skip
    print(write_json("fp_baseline.json", payload, args.out_dir))


if __name__ == "__main__":
    main()
