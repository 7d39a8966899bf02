"""Which fitness ranks genomes as the evaluation spaces do (issue 19), without a
search: a fixed set of W6A6-budget genomes (searched ones from the GPU search table,
the seed, random ones repaired to the budget) is scored by every fitness on the
search's noise (train statistics, or the teacher), and in every evaluation space on
fresh noise against the test split; Spearman's rho between each fitness and each
space says which fitness the evaluation spaces agree with.

    python -m benchmarks.experiments.fitness_agreement [--samples 256]
        [--eval-samples 512] [--random 3] [--out fitness_agreement_cpu.json]
    python -m benchmarks.experiments.fitness_agreement --summarize FILE.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

from benchmarks.common import RESULTS, provenance, write_json
from benchmarks.rescore_rows import genome_of
from benchmarks.search_table import _run_config
from tmpq_jax.search import budget as budget_lib
from tmpq_jax.search import prepare
from tmpq_jax.search.outputs import rescore_images

FITNESSES = ("fid", "teacher", "ensemble")
SPACES = ("fid_eval_resnet", "fid_eval_simclr", "fid_pixels")
SEARCHED = [("joint", s) for s in (0, 1, 2)] + [("precision", s) for s in (0, 1, 2)]
SEARCHED += [("random", 0), ("timesteps", 0)]


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def genomes(setup, n_random: int) -> list[tuple[str, np.ndarray]]:
    """(name, genome): the table's searched W6A6 rows, the seed, random ones."""
    table = json.loads((RESULTS / "search_table.json").read_text())["rows"]
    by = {(r["method"], r["seed"]): r for r in table
          if r.get("model", "unet") == "unet" and r["budget"] == "w6a6"
          and r.get("fitness", "fid") == "fid"}  # fmt: skip
    out = [(f"{m} s{s}", genome_of(setup, by[m, s])) for m, s in SEARCHED]
    out.append(("seed (uniform W6A6, quad)", np.asarray(setup.space.seed)))
    reg, budget = setup.engine.problem.registry, setup.budget
    rand = setup.space.random(jax.random.key(7), n_random)
    for i in range(n_random):
        g = budget_lib.repair(setup.space, reg, rand[i], budget)
        out.append((f"random {i}, repaired", np.asarray(g)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256, help="the fitness's")
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--random", type=int, default=3)
    ap.add_argument("--workdir", default="runs/fitness_agreement")
    ap.add_argument("--out", default="fitness_agreement_cpu.json")
    ap.add_argument("--summarize", help="recompute the rho of an existing file")
    a = ap.parse_args()
    if a.summarize:  # no measuring: the rows as they are
        d = json.loads((RESULTS / a.summarize).read_text())
        return print(write_json(a.summarize, d | agreement(d["rows"])))
    # the teacher as measured (pixels + the classifier's features), not today's default
    over = [f"search.num_samples={a.samples}", "search.fitness=teacher",
            "search.teacher_feature_weight=1.0",
            "search.select=ensemble", f"search.rescore_samples={a.eval_samples}",
            "search.rescore_batch=256", "search.sample_chunk=64"]  # fmt: skip
    setup = prepare(_run_config("w6a6", "joint", 0, over), a.workdir, progress=False)
    problem, assets = setup.engine.problem, setup.assets
    scorers = {f: dataclasses.replace(problem, fitness=f) for f in FITNESSES}
    sample = jax.jit(problem.sample)
    rows = []
    for name, g in genomes(setup, a.random):
        x = np.clip(np.asarray(sample(assets, g, assets.noise, assets.labels)), -1, 1)
        row = {"genome": name}
        row |= {f: float(s.score_images(assets, x)) for f, s in scorers.items()}
        ev = setup.evaluator.score(
            rescore_images(setup, lambda x, y, g=g: sample(assets, g, x, y))
        )
        row |= {k: ev.get(k) for k in (*SPACES, "precision", "recall")}
        row["fid_test_clf"] = ev["fid"]  # the fid fitness's net, on the test split
        rows.append(row)
        print(row, flush=True)
    payload = dict(provenance(), samples=a.samples, eval_samples=a.eval_samples)
    payload |= {"what": __doc__.split("\n\n")[0], "rows": rows}
    print(write_json(a.out, payload | agreement(rows)))


def agreement(rows: list[dict]) -> dict:
    """Spearman's rho of each fitness with each space: over every genome, and over
    the searched ones alone (where a fitness could be gamed; the seed and the random
    genomes are far worse in every space, which any fitness ranks)."""
    names = {f"{m} s{s}" for m, s in SEARCHED}
    out = {}
    for key, rs in (("spearman", rows), ("spearman_searched", [
            r for r in rows if r["genome"] in names])):  # fmt: skip
        out[key] = {f: {s: spearman([r[f] for r in rs], [r[s] for r in rs])
                        for s in SPACES} for f in FITNESSES}  # fmt: skip
        out[key]["genomes"] = len(rs)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
