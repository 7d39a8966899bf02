"""Score searched genomes already in a search table in the evaluation spaces.

Rows written before the evaluation nets existed carry each genome (`timesteps`
and per-layer `layers` bits) but only the fitness net's FID. This rebuilds each
genome, checks it decodes back to the same steps and bits, draws the same fresh
samples `tmpq search` re-scores on (test split), and adds `fid_eval_<name>`,
`precision` and `recall`. The row keeps its search's provenance; the new scores
carry their own (`rescore_device`, `rescore_date`, `rescore_command`), and the
search run's own 10k FID stays as `fid_10k_search_run`, a check that the
genome was rebuilt (the two draw the same noise).

  python -m benchmarks.rescore_rows benchmarks/results/search_table.json \
      --budgets w6a6,w4a8 --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import provenance, write_json
from benchmarks.search_table import _run_config, eval_scores
from tmpq_jax.genome_file import genome_from_dict
from tmpq_jax.search import prepare
from tmpq_jax.search.outputs import rescore


def genome_of(setup, row: dict) -> np.ndarray:
    """The row's genome in the joint space of `setup`, checked to decode back."""
    where = f"{row['budget']} {row['method']} seed {row['seed']}"
    g = genome_from_dict(
        row, setup.registry, setup.space.candidates,
        setup.lm.diffusion.num_timesteps, where,
    )  # fmt: skip
    genome = setup.space.encode(g.timesteps, g.bits)
    d = setup.space.decode(genome)
    for got, want in zip(
        (d.timesteps, d.bits.w_bits, d.bits.a_bits),
        (g.timesteps, g.bits.w_bits, g.bits.a_bits),
        strict=True,
    ):
        if not np.array_equal(np.asarray(got), np.asarray(want)):
            raise ValueError(f"{where}: the genome does not decode back")
    return genome


def rescore_rows(rows, budget: str, root: Path, overrides=(), model: str = "unet"):
    """Yields each searched row of `budget` that lacks evaluation spaces, scored."""
    todo = [
        r
        for r in rows
        if r["budget"] == budget
        and r.get("model", "unet") == model
        and "layers" in r
        and "fid_eval_resnet" not in r
    ]
    if not todo:
        return
    setup = prepare(
        _run_config(budget, "joint", 0, list(overrides), model), root / budget
    )
    prov = provenance()
    for r in todo:
        scores, _ = rescore(setup, setup.evaluator, genome_of(setup, r), False)
        yield {
            **r,
            "fitness": r.get("fitness", "fid"),
            "fid_10k_search_run": r["fid_10k"],
            "fid_10k": scores["fid"],
            "rescored": scores,
            "fid": scores["fid"],
            **eval_scores(scores),
            "precision": scores.get("precision"),
            "recall": scores.get("recall"),
            **{f"rescore_{k}": prov[k] for k in ("device", "date", "command")},
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("table")
    ap.add_argument("--budgets", default="w6a6,w4a8")
    ap.add_argument("--workdir-root", default="runs/rescore_rows")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE")
    args = ap.parse_args()
    src = json.loads(Path(args.table).read_text())
    out = Path(args.out_dir or ".") / "search_table_rescored.json"
    done = json.loads(out.read_text())["rows"] if out.exists() else []
    # a row is its model, budget, method, fitness and seed (a DiT's joint seed 0
    # is not the UNet's, nor a teacher search's the fid search's)
    key = lambda r: (r.get("model", "unet"), r["budget"], r["method"], r.get("fitness", "fid"), r["seed"])  # fmt: skip
    seen = {key(r) for r in done}
    rows = [r for r in src["rows"] if key(r) not in seen]
    for budget in args.budgets.split(","):
        for r in rescore_rows(rows, budget, Path(args.workdir_root), args.override):
            print(
                f"{budget} {r['method']:10s} seed {r['seed']}: fid {r['fid']:.2f} "
                f"(search run {r['fid_10k_search_run']:.2f}) resnet "
                f"{r['fid_eval_resnet']:.2f} simclr {r['fid_eval_simclr']:.2f}",
                flush=True,
            )
            done.append(r)
            payload = {**src, **provenance(), "rows": done, "parts": src["parts"]}
            write_json(out.name, payload, out.parent)


if __name__ == "__main__":
    main()
