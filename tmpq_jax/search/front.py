"""What a front search (`search.objective=front`) adds to its workdir.

* `front.json`: the non-dominated (total BitOPs, fitness) genomes among every
  feasible genome the search scored, by rising BitOPs, as a `tmpq-genome/1` file:
  its top level is the front's best-fitness point (the costliest, at or below the
  budget), and `"front"` lists every point as a genome of its own (timesteps, bits
  per layer, calibration, model fingerprint, `fid_search`, `fitness`, BitOPs).
  `tmpq sample --genome front.json` serves the top level;
  `tmpq sample --genome front.json --pick BITOPS` the point with the most BitOPs at
  or below BITOPS (`genome_file.pick_from_front`).
* `front.png`: the front over every scored genome, with the budget.

The front's points carry the search's own fitness (its `num_samples`); they are
not re-scored (the top-k of `topk.json` are).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tmpq_jax import files
from tmpq_jax.evaluation import FITNESS_NAMES
from tmpq_jax.genome_file import write_genome
from tmpq_jax.provenance import provenance
from tmpq_jax.search.outputs import _command, _genome_entry
from tmpq_jax.search.setup import Setup

FRONT_FILE = "front.json"
FRONT_PLOT = "front.png"


def front_entries(setup: Setup, t: dict, points: np.ndarray) -> list[dict]:
    """Genome dicts of archive rows `points` (rising BitOPs)."""
    cfg = setup.run.search
    return [
        _genome_entry(
            setup,
            t,
            int(i),
            fid_search=float(t["fid"][i]),
            fitness=float(t["fitness"][i]),
            search_samples=cfg.num_samples,
            generation=int(t["generation"][i]),
        )
        for i in points
    ]


def write_front(
    setup: Setup, t: dict, mask: np.ndarray, front: np.ndarray, workdir: Path
) -> dict:
    """Writes `front.json` and `front.png`; returns the summary `result.json`
    keeps. `mask`: the feasible archive rows; `front`: indices into them of the
    non-dominated ones by rising BitOPs (`outputs.pareto_front`)."""
    cfg = setup.run.search
    points = np.flatnonzero(mask)[front]
    entries = front_entries(setup, t, points)
    best = entries[int(np.argmin([e["fitness"] for e in entries]))]
    write_genome(
        workdir / FRONT_FILE,
        {
            **best,
            "metric": FITNESS_NAMES[cfg.fitness],
            "method": cfg.strategy,
            "objective": cfg.objective,
            "budget_bitops": setup.budget,
            "evaluations": int(len(t["fid"])),
            "front": entries,
            "search": cfg.to_dict(),
            **provenance(_command()),
        },
    )
    front_plot(t, mask, points, setup.budget, workdir / FRONT_PLOT, cfg.fitness)
    costs = [e["total_bitops"] for e in entries]
    return {"file": FRONT_FILE, "points": len(entries), "total_bitops": costs}


def front_plot(
    t: dict, mask: np.ndarray, points, budget: float, path: Path, fitness: str
) -> None:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    ax.scatter(
        t["bitops"][mask], t["fid"][mask], s=8, c="0.7", label="scored (feasible)"
    )
    ax.step(t["bitops"][points], t["fid"][points], where="post", c="C3", lw=1.2)
    ax.scatter(
        t["bitops"][points],
        t["fid"][points],
        s=22,
        c="C3",
        label=f"front ({len(points)} genomes)",
    )
    ax.axvline(budget, ls="--", c="0.3", lw=1, label="budget (the front's bound)")
    ax.set_xlabel("total BitOPs per image (all steps)")
    ax.set_ylabel(FITNESS_NAMES[fitness])
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
