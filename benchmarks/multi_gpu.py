"""The search's population sharded over 1, 2, ... devices of one host: generation
wall time and evaluations per second against the device count.

Each count runs the paper protocol for `--generations` generations in its own
process (`CUDA_VISIBLE_DEVICES`, or forced CPU devices); the first two compile, the
steady time is the later ones' mean. The best fitness per generation is kept.

  python -m benchmarks.multi_gpu --devices 1,2 --generations 5   # on a 2-GPU host
  python -m benchmarks.multi_gpu --summarize benchmarks/results/multi_gpu.json
  JAX_PLATFORMS=cpu python -m benchmarks.multi_gpu --devices 1,2 --generations 3 \
      --override search.num_samples=136 --override search.population=4 --out /tmp/m.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, add_args, ints, provenance, write_json

CONFIG = str(REPO / "configs" / "fmnist_search.py")
COMPILING = 2  # generations that compile: the first one's program, then the step's


def worker(generations: int, overrides: list[str], out: Path) -> None:
    """One device count: run the generations, write their log and the mesh."""
    import jax

    from tmpq_jax.config import load_config
    from tmpq_jax.search import SearchRunConfig, prepare
    from tmpq_jax.search.run import read_log, run_generations
    from tmpq_jax.search.sharding import search_mesh

    cd = load_config(CONFIG, [f"search.generations={generations}", *overrides])
    run = SearchRunConfig.from_configdict(cd)
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        run_generations(prepare(run, Path(wd), progress=False), wd, progress=False)
        wall, log = time.perf_counter() - t0, read_log(wd)
    mesh = search_mesh(run.search)
    payload = dict(
        devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
        mesh=dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)), wall_s=wall,
        generation_s=[r["wall_s"] for r in log],
        evaluated_by_generation=[r["evaluated"] for r in log],
        best_fitness_by_generation=[r["best_fitness_so_far"] for r in log],
    )  # fmt: skip
    out.write_text(json.dumps(payload))


def _env(n: int) -> dict:
    """The first n GPUs CUDA_VISIBLE_DEVICES leaves, or n forced CPU devices."""
    env = dict(os.environ)
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
    return env


def _row(n: int, generations: int, overrides: list[str]) -> dict:
    """One device count's row, from a worker process."""
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.multi_gpu", "--worker", str(res)]
        cmd += ["--generations", str(generations)]
        cmd += [a for o in overrides for a in ("--override", o)]
        p = subprocess.run(cmd, env=_env(n), capture_output=True, text=True)
        if p.returncode or not res.exists():
            return dict(devices=n, error=p.stderr.strip().splitlines()[-3:])
        row = json.loads(res.read_text())
    if row["devices"] != n:  # fewer GPUs than asked, or no GPU at all
        return dict(devices=n, error=f"asked {n}, JAX saw {row['devices']}")
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(ap, devices="1,2", generations=5)
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS / "multi_gpu.json"))
    ap.add_argument("--summarize", type=Path, help="recompute an existing file's rates")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.generations, a.override, a.worker)
    if a.summarize:
        raw = summarize(json.loads(a.summarize.read_text()))
        return print(write_json(a.summarize.name, raw, a.summarize.parent))
    out, meta = Path(a.out), dict(generations=a.generations, overrides=a.override)
    raw = dict(provenance(), config="configs/fmnist_search.py", **meta, rows=[])
    for n in ints(a.devices):
        raw["rows"].append(_row(n, a.generations, a.override))
        print(json.dumps(raw["rows"][-1]), flush=True)
        write_json(out.name, raw, out.parent)
    write_json(out.name, summarize(raw), out.parent)


def summarize(raw: dict) -> dict:
    """Steady generation seconds, evaluations/s and speedup over one device, derived
    from the rows' per-generation times (recomputed, never measured here)."""
    rows = [r for r in raw["rows"] if len(r.get("generation_s", [])) > COMPILING]
    for r in rows:
        r.pop("evaluations_per_s_after_first", None)  # older files: gen 1 compiles
        steady = r["generation_s"][COMPILING:]
        r["steady_generation_s"] = sum(steady) / len(steady)
        if "evaluated_by_generation" in r:
            n = r["evaluated_by_generation"][COMPILING:]
            r["evaluations_per_s_steady"] = sum(n) / sum(steady)
    base = next((r for r in rows if r["devices"] == 1), None)
    for r in rows if base else []:
        r["speedup"] = base["steady_generation_s"] / r["steady_generation_s"]
        r["scaling_efficiency"] = r["speedup"] / r["devices"]
    raw["steady_from_generation"] = COMPILING
    return raw


if __name__ == "__main__":
    main()
