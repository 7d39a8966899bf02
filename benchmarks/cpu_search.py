"""`tmpq search` on a CPU as the README's first command runs it (a fresh process and
compilation cache, the CPU default configs/fmnist_search_cpu.py), and its genome
against the seed genome (uniform W6A6, quad steps) in the evaluation spaces, both
re-scored on the same fresh samples (test split). `--before`: the former default
(FID fitness on 256 samples, the best 2 re-scored on 512) first, in the same run.
Merged into results/cpu.json (`search_default_wall_s`, `search_default`, ...).

  JAX_PLATFORMS=cpu python -m benchmarks.cpu_search [--before]
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, load_result, provenance, write_json
from benchmarks.cpu import cpu_model
from tmpq_jax.config import load_config
from tmpq_jax.search import SearchRunConfig, prepare
from tmpq_jax.search.outputs import rescore
from tmpq_jax.search.run import read_log

CONFIG = "configs/fmnist_search_cpu.py"
BEFORE = ["fitness=fid", "num_samples=256", "rescore_top_k=2", "rescore_samples=512"]
BEFORE += ["select=fitness"]  # the former default, as overrides of CONFIG
CPU_S = ("ru_utime", "ru_stime")  # the search process's user + system seconds
KEYS = ("fid", "fid_eval_resnet", "fid_eval_simclr", "fid_pixels", "precision")
KEYS += ("recall",)  # precision and recall: higher is better; FIDs: lower


def measure(overrides: list[str]) -> dict:
    flags = [f"--config.search.{o}" for o in overrides]
    with tempfile.TemporaryDirectory() as tmp:  # fresh workdir and compile cache
        env = dict(os.environ, JAX_PLATFORMS="cpu", TMPQ_COMPILATION_CACHE=tmp + "/c")
        cmd = [sys.executable, "-m", "tmpq_jax", "search", "--no-progress"]
        cpu0, load0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--workdir", tmp + "/wd", *flags], env=env, check=True)
        wall, load1 = time.perf_counter() - t0, os.getloadavg()
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        log = read_log(tmp + "/wd")
        res = json.loads((Path(tmp) / "wd" / "result.json").read_text())
        cd = load_config(str(REPO / CONFIG), [f"search.{o}" for o in overrides])
        run = SearchRunConfig.from_configdict(cd)
        setup = prepare(run, Path(tmp) / "wd", progress=False)
        seed = np.load(Path(tmp) / "wd" / "archive.npz")["genomes"][0]  # gen 0, row 0
        seed_scores, _ = rescore(setup, setup.evaluator, seed, False)
    got, ref = res["rescored"], seed_scores
    better = {k: got[k] > ref[k] if k in ("precision", "recall") else got[k] < ref[k]
              for k in KEYS}  # fmt: skip
    return {
        "command": " ".join(["tmpq search", *flags]),
        "config": {CONFIG: run.search.to_dict()},
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(getattr(cpu1, k) - getattr(cpu0, k) for k in CPU_S), 1),
        "load_avg_start_end": [round(load0[0], 2), round(load1[0], 2)],
        "generation_s": [r["wall_s"] for r in log],
        "evaluations": res["evaluations"],
        "sample_forwards": res["sample_forwards"],
        "fitness_search": res["fid_search"],
        "fitness_seed_genome": res["seed_genome"]["fid_search"],
        "timesteps": res["timesteps"],
        "rescore_samples": got["num_samples"],
        "searched": {k: got[k] for k in KEYS},
        "seed_genome": {k: ref[k] for k in KEYS},
        "searched_beats_seed": better,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", action="store_true", help="also the former default")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--out", default="cpu.json", help="file name (merged into)")
    args = ap.parse_args()
    load0, cores = os.getloadavg(), len(os.sched_getaffinity(0))
    rows = {"search_before": measure(BEFORE)} if args.before else {}
    rows["search_default"] = measure([])
    prov, now = provenance(), datetime.datetime.now(datetime.UTC)
    payload = {
        **(load_result(args.out) or {}),
        "search_default_wall_s": rows["search_default"]["wall_s"],
        **rows,
        "search_provenance": {
            "device": f"{cpu_model()}, {cores} cores", "date": prov["date"],
            "finished": now.isoformat(timespec="seconds"), "command": prov["command"],
            "jax_version": prov["jax_version"],
            "shared_load": "machine shared with other engineers' jobs during the "
                f"measurement (load average {load0[0]:.1f} at start, "
                f"{os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} cores; each "
                "run's own in load_avg_start_end): wall times are inflated; cpu_s "
                "(the search process's user + system CPU seconds) is less load-bound",
        },
    }  # fmt: skip
    print(write_json(args.out, payload, args.out_dir))


if __name__ == "__main__":
    main()
