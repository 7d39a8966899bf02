"""Host time a search spends before its first generation runs: setup, and tracing and
lowering its two programs (generation 0 and the next ones), with racing off and on.

The persistent compilation cache skips XLA's compile, never this: a new process, or a
new `Setup` in the same one (another seed), traces and lowers both programs again. A
race traces the population's scoring twice (the prefix and the kept candidates' full
batch: two shapes). Tracing does not depend on how many samples a candidate gets, so
the samples (and the teacher's steps) are cut to keep the setup short on a CPU.

  python -m benchmarks.experiments.program_tracing [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import REPO, provenance, write_json
from tmpq_jax.config import load_config
from tmpq_jax.search import SearchRunConfig
from tmpq_jax.search.setup import prepare

SMALL = ["search.num_samples=16", "search.teacher_steps=10"]
CASES = {"no race": [], "race": ["search.race_samples=8"]}


def measure(overrides: list[str], workdir: Path) -> dict:
    """Seconds of prepare, then of tracing and lowering each program."""
    spec = str(REPO / "configs" / "fmnist_search.py")
    run = SearchRunConfig.from_configdict(load_config(spec, [*SMALL, *overrides]))
    t0 = time.perf_counter()
    setup = prepare(run, workdir, progress=False)
    out = {"prepare_s": time.perf_counter() - t0}
    first, nxt = setup.engine.programs
    t0 = time.perf_counter()
    traced = first.trace(setup.assets, np.int32(0))
    out["trace_first_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    traced.lower()
    out["lower_first_s"] = time.perf_counter() - t0
    state = jax.eval_shape(first, setup.assets, np.int32(0))  # from the trace cache
    t0 = time.perf_counter()
    traced = nxt.trace(setup.assets, state)
    out["trace_next_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    traced.lower()
    out["lower_next_s"] = time.perf_counter() - t0
    out["equations_first"] = len(first.trace(setup.assets, np.int32(0)).jaxpr.eqns)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", help="default: benchmarks/results")
    ap.add_argument("--workdir", default="runs/program_tracing")
    a = ap.parse_args(argv)
    rows = {}
    for name, over in CASES.items():
        rows[name] = measure(over, Path(a.workdir))
        print(name, rows[name])
    payload = {
        **provenance(),
        "what": "host seconds before the first generation: setup, trace, lower",
        "config": "configs/fmnist_search.py",
        "overrides": SMALL,
        "cases": {k: {"overrides": CASES[k], **v} for k, v in rows.items()},
    }
    write_json("program_tracing.json", payload, a.out_dir)


if __name__ == "__main__":
    main()
