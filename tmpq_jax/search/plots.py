"""The search's pictures (each written atomically as PNG).

Figures are `matplotlib.figure.Figure`s, never pyplot's: no backend is chosen and
no global state touched, so a notebook's own inline plots keep working.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tmpq_jax import files
from tmpq_jax.diffusion.schedules import quad_group_bounds, quad_timesteps
from tmpq_jax.evaluation import FITNESS_NAMES


def _subplots(figsize) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> None:
    files.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))


def fid_vs_bitops(t, mask, front, budget, path: Path, fitness: str) -> None:
    fig, ax = _subplots((6.4, 4.4))
    g = t["generation"]
    sc = ax.scatter(
        t["bitops"][mask], t["fid"][mask], c=g[mask], s=12, cmap="viridis", alpha=0.8
    )
    over = ~mask & (t["samples"] == t["samples"].max())  # not a race's prefix scores
    if over.any():
        ax.scatter(
            t["bitops"][over],
            np.minimum(t["fid"][over], t["fid"][mask].max()),
            marker="x",
            s=10,
            c="0.6",
            label="over budget",
        )
    f = np.flatnonzero(mask)[front]
    ax.step(
        t["bitops"][f], t["fid"][f], where="post", c="C3", lw=1.5, label="Pareto front"
    )
    ax.scatter(
        t["bitops"][0],
        t["fid"][0],
        marker="*",
        s=120,
        c="k",
        label="seed (quad, uniform)",
    )
    ax.axvline(budget, ls="--", c="0.3", lw=1, label="budget")
    ax.set_xlabel("total BitOPs per image (all steps)")
    ax.set_ylabel(FITNESS_NAMES[fitness])
    ax.set_yscale("log")
    fig.colorbar(sc, ax=ax, label="generation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def bit_allocation(registry, best: dict, path: Path) -> None:
    names = list(registry.names)
    w = [best["layers"][n]["w_bits"] for n in names]
    a = [best["layers"][n]["a_bits"] for n in names]
    x = np.arange(len(names))
    fig, ax = _subplots((max(6.4, 0.16 * len(names)), 3.6))
    ax.bar(x - 0.2, w, width=0.4, label="weight / right operand bits")
    ax.bar(x + 0.2, a, width=0.4, label="activation / left operand bits")
    ax.set_xticks(x, names, rotation=90, fontsize=5)
    ax.set_ylabel("bits")
    ax.set_ylim(0, 9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def timesteps(best: dict, num_steps: int, num_timesteps: int, path: Path) -> None:
    fig, ax = _subplots((6.4, 2.2))
    edges = quad_group_bounds(num_steps, num_timesteps)
    for e in edges:
        ax.axvline(e, c="0.85", lw=0.8)
    ax.scatter(
        quad_timesteps(num_steps, num_timesteps),
        np.full(num_steps, 1),
        marker="|",
        s=200,
        label="quad",
    )
    ts = best["timesteps"]
    ax.scatter(ts, np.zeros(len(ts)), marker="|", s=200, c="C3", label="searched")
    ax.set_yticks([0, 1], ["searched", "quad"])
    ax.set_ylim(-0.8, 1.8)
    ax.set_xlabel("timestep (grey: quad groups)")
    fig.tight_layout()
    _save(fig, path)


def write_all(setup, t, mask, front, best: dict, workdir: Path) -> None:
    fitness = setup.run.search.fitness
    fid_vs_bitops(t, mask, front, setup.budget, workdir / "fid_vs_bitops.png", fitness)
    bit_allocation(setup.registry, best, workdir / "bit_allocation.png")
    timesteps(
        best,
        setup.run.search.num_steps,
        setup.lm.diffusion.num_timesteps,
        workdir / "timesteps.png",
    )
