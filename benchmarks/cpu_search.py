"""How long `tmpq search`'s CPU default takes on this machine: the reduced protocol
of configs/fmnist_search_cpu.py (population 8, 3 generations, 256 samples) run end
to end on the shipped model, as the README's first command does.

  JAX_PLATFORMS=cpu python -m benchmarks.cpu_search [--out-dir DIR] [--out NAME]
  JAX_PLATFORMS=cpu taskset -c 0-7 python -m benchmarks.cpu_search --out cpu_search_8cores.json

Writes cpu_search.json: CPU cores, wall seconds (whole job and per generation, the
first including compilation), model forwards per second, the best genome's FIDs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import provenance, write_json
from tmpq_jax.config import load_config
from tmpq_jax.search import SearchRunConfig, search
from tmpq_jax.search.run import read_log

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fmnist_search_cpu.py")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--out", default="cpu_search.json", help="file name")
    args = ap.parse_args()
    run = SearchRunConfig.from_configdict(load_config(CONFIG, []))
    cfg = run.search
    with tempfile.TemporaryDirectory() as wd:  # a fresh search, never a resumed one
        t0 = time.perf_counter()
        res = search(run, wd, progress=False)
        wall = time.perf_counter() - t0
        log = read_log(wd)
    gen_s = [r["wall_s"] for r in log]
    forwards = [
        r["evaluated"] * cfg.num_samples * cfg.num_steps for r in log
    ]  # the first generation's rate includes compilation
    payload = {
        **provenance(),
        "cpu_cores": len(os.sched_getaffinity(0)),  # what taskset left us
        "cpu_model": _cpu_model(),
        "config": "configs/fmnist_search_cpu.py",
        "wall_s": round(wall, 1),
        "generation_s": gen_s,
        "forwards_per_s_after_first": round(sum(forwards[1:]) / sum(gen_s[1:]), 1),
        "evaluations": res["evaluations"],
        "fid_search": res["fid_search"],
        "fid_rescored": res["rescored"]["fid"],
        "rescore_samples": cfg.rescore_samples,
        "total_bitops": res["total_bitops"],
        "budget_bitops": res["budget_bitops"],
    }
    print(write_json(args.out, payload, args.out_dir))


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
