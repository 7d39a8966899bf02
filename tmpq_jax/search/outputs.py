"""What a finished search leaves in its workdir.

* `archive.npz`: every evaluated genome with its FID, fitness, BitOPs, weight bits,
  generation, decoded timesteps and the samples it was scored on (a race's dropped
  ones: the prefix; search/racing.py); `pareto.json`: the non-dominated (BitOPs,
  FID) genomes among the fully scored ones.
* `result.json` also counts the work: `samples_scored`, `sample_forwards` (the
  same count with racing on or off) and `raced_out`.
* `topk.json`: the best `rescore_top_k` distinct feasible genomes re-scored on
  `rescore_samples` fresh samples (TMPQ-DM re-scores its top 10);
  `result.json`: the best of them by the re-scored FID, as a `tmpq-genome/1` file
  (`tmpq sample --genome result.json` samples from it).
* plots: FID vs BitOPs with the front, the per-layer bit allocation, the chosen
  timesteps against quad, and a sample grid of the best genome.
* a front search (`search.objective=front`): `front.json` and `front.png`
  (`front.py`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax import files
from tmpq_jax.checkpoint import REPO_ROOT
from tmpq_jax.diffusion.flow import gene_times
from tmpq_jax.evaluation import FITNESS_NAMES, Evaluator
from tmpq_jax.genome_file import genome_to_dict, write_genome
from tmpq_jax.images import save_grid
from tmpq_jax.provenance import provenance
from tmpq_jax.quant import cost
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.sampling import to_uint8
from tmpq_jax.search import plots, racing, sharding
from tmpq_jax.search.engine import SearchState
from tmpq_jax.search.run import RESULT_FILE
from tmpq_jax.search.sampler import labels_for
from tmpq_jax.search.setup import NOISE_STREAM, Setup

RESCORE_STREAM = 1  # folded into the noise key: rescoring never reuses fitness noise


@contextlib.contextmanager
def clock(seconds: dict | None, key: str):
    """Adds the block's wall time to `seconds[key]` (None: nothing kept)."""
    t0 = time.perf_counter()
    yield
    if seconds is not None:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0


def archive_table(setup: Setup, state: SearchState) -> dict[str, np.ndarray]:
    """The archive as flat host arrays, one entry per evaluated genome."""
    a = jax.device_get(state.archive)
    count = np.asarray(a.count)
    rows = [(g, i) for g in range(len(count)) for i in range(int(count[g]))]
    gi = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    genomes = np.asarray(a.genomes)[gi]
    decode = jax.jit(jax.vmap(setup.space.decode))
    d = decode(genomes)
    return {
        "genomes": genomes,
        "generation": gi[0].astype(np.int32),
        "fid": np.asarray(a.fid)[gi],
        "fitness": np.asarray(a.fitness)[gi],
        "bitops": np.asarray(a.bitops)[gi],
        "samples": np.asarray(a.samples)[gi],
        "size_bits": np.asarray(cost.model_size_bits(d.bits, setup.registry)),
        "timesteps": np.asarray(d.timesteps),
        "num_steps": np.asarray(d.num_steps),
        "w_bits": np.asarray(d.bits.w_bits),
        "a_bits": np.asarray(d.bits.a_bits),
    }


def fully_scored(t: dict) -> np.ndarray:
    """Entries scored on all the samples (not dropped by a race: search/racing.py;
    every generation scores some in full)."""
    return t["samples"] == t["samples"].max()


def feasible_mask(t: dict, budget: float) -> np.ndarray:
    """Within the budget, finite, and fully scored: what results are made of."""
    ok = np.asarray(cost.within_budget(t["bitops"], budget)) & (t["fid"] < 1e4)
    return ok & fully_scored(t)


def pareto_front(bitops: np.ndarray, fid: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (minimizing both), by rising BitOPs."""
    order = np.lexsort((fid, bitops))
    front, best = [], np.inf
    for i in order:
        if fid[i] < best:
            front.append(i)
            best = fid[i]
    return np.array(front, dtype=int)


def top_k_distinct(t: dict, mask: np.ndarray, k: int) -> list[int]:
    """The k best feasible entries by FID, one per distinct genome."""
    seen, out = set(), []
    for i in np.argsort(np.where(mask, t["fid"], np.inf)):
        if not mask[i] or len(out) == k:
            break
        key = t["genomes"][i].tobytes()
        if key not in seen:
            seen.add(key)
            out.append(int(i))
    return out


def rescore_images(
    setup: Setup, sample_fn, progress: bool = False, with_noise: bool = False
):
    """`rescore_samples` images from `sample_fn(x_T, labels)`, on fresh noise that
    never overlaps the fitness noise (labels: class-balanced per batch, None for
    an unconditional model), clipped to [-1, 1] (NaN kept for the caller);
    `with_noise`: (images, x_T, labels)."""
    cfg, c = setup.run.search, setup.lm.config
    key = jax.random.fold_in(jax.random.key(NOISE_STREAM), RESCORE_STREAM)
    sampler = setup.engine.problem.sampler
    n, bs = cfg.rescore_samples, min(cfg.rescore_batch, cfg.rescore_samples)
    out, noise, labels = [], [], []
    for b in tqdm(
        range(-(-n // bs)), disable=not progress, desc="rescore", leave=False
    ):
        k = jax.random.fold_in(key, b)
        x = jax.random.normal(k, (bs, c.image_size, c.image_size, c.channels))
        y = labels_for(sampler, jax.random.fold_in(k, 1), bs)
        out.append(np.asarray(sample_fn(x, y)))
        noise.append(np.asarray(x))
        labels.append(None if y is None else np.asarray(y))
    images = np.clip(np.concatenate(out)[:n], -1.0, 1.0)
    if not with_noise:
        return images
    y = None if labels[0] is None else np.concatenate(labels)[:n]
    return images, np.concatenate(noise)[:n], y


def rescore(setup: Setup, ev: Evaluator, genome: np.ndarray, progress: bool):
    """(scores, images) of `rescore_samples` fresh samples of one genome; `ev`
    scores them (the test split: a figure to report, never to select by)."""
    scores, images, _ = rescore_and_select(setup, genome, progress, ev)
    return scores, images


def rescore_and_select(setup: Setup, genome, progress: bool, ev=None, seconds=None):
    """(report, images, select): fresh samples of one genome, reported on the
    test split (`setup.report`, or `ev`) and scored for selection by what the
    search may use (`setup.select_score`: train split or teacher; lower is
    better). `seconds`: a dict the three parts' times are added to."""
    sample = setup.engine.problem.jitted_sample  # compiled once per problem
    mesh = setup.engine.mesh

    def sample_fn(x, y):  # the batch split over the search's devices, gathered back
        x = sharding.split_batch(x, mesh)
        y = None if y is None else sharding.split_batch(y, mesh)
        return sharding.gather(sample(setup.assets, genome, x, y))

    with clock(seconds, "rescore_sampling"):
        images, x_T, y = rescore_images(setup, sample_fn, progress, with_noise=True)
    if not np.isfinite(images).all():
        return {"fid": float("inf"), "finite": False}, images, float("inf")
    with clock(seconds, "report"):
        report = ev.score(images) if ev is not None else setup.report(images)
    with clock(seconds, "select"):
        select = setup.select_score(images, x_T, y)
    return report, images, select


def _portable(path: Path | None) -> str | None:
    """A path inside the repository is written relative to it (files move)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _command() -> str:
    argv0 = Path(sys.argv[0]).name
    head = "tmpq" if argv0 == "tmpq" else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def _genome_entry(setup: Setup, t: dict, i: int, **extra) -> dict:
    from tmpq_jax.quant.supernet import QuantBits

    n = int(t["num_steps"][i])
    ts = np.unique(t["timesteps"][i])[:n]
    bits = QuantBits(t["w_bits"][i], t["a_bits"][i])
    return genome_to_dict(
        ts,
        bits,
        setup.registry,
        setup.run.search.candidates,
        full_precision=setup.run.search.space == "timesteps_fp",
        calibration=_portable(setup.calibration_path),
        model_fingerprint=model_fingerprint(setup.lm.card),
        model=getattr(setup.lm, "source", None),
        num_timesteps=setup.lm.diffusion.num_timesteps,
        **sampler_entry(setup, ts),
        **extra,
    )


def sampler_entry(setup: Setup, ts) -> dict:
    """A flow model's genome says how it samples: its solver, guidance scale and
    the times its genes stand for (gene k: t = (k + 1) / R)."""
    if setup.lm.prediction != "velocity":
        return {}
    c, R = setup.run.search, setup.lm.diffusion.num_timesteps
    times = gene_times(np.asarray(ts, np.float64), R)
    return {
        "sampler": {
            "kind": "flow",
            "solver": c.solver,
            "guidance": c.guidance,
            "shift": c.shift,
            "times": [round(float(t), 6) for t in times[::-1]],
        }
    }


def write_outputs(
    setup: Setup,
    state: SearchState,
    workdir: Path,
    progress: bool = True,
    seconds: dict | None = None,
) -> dict:
    """Writes the files above; returns the result. `seconds`: a dict the times of
    re-scoring (sampling, report, selection) and plotting are added to."""
    cfg = setup.run.search
    t = archive_table(setup, state)
    mask = feasible_mask(t, setup.budget)
    if not mask.any():
        raise RuntimeError("no feasible genome was evaluated")  # budget check forbids
    files.atomic_write(workdir / "archive.npz", lambda p: np.savez(p, **t))
    front = pareto_front(t["bitops"][mask], t["fid"][mask])
    feas_idx = np.flatnonzero(mask)
    files.write_json(
        workdir / "pareto.json",
        {
            "metric": FITNESS_NAMES[cfg.fitness],
            "num_samples": cfg.num_samples,
            "points": [
                {
                    "fid": float(t["fid"][i]),
                    "total_bitops": float(t["bitops"][i]),
                    "size_bits": float(t["size_bits"][i]),
                    "timesteps": np.unique(t["timesteps"][i]).tolist(),
                    "generation": int(t["generation"][i]),
                }
                for i in feas_idx[front]
            ],
        },
    )
    # Ranked by what the search may use (train split / teacher); the test split
    # only reports (`rescored`), it never picks the genome.
    ranked, grids = [], {}
    for rank, i in enumerate(top_k_distinct(t, mask, cfg.rescore_top_k)):
        scores, images, select = rescore_and_select(
            setup, t["genomes"][i], progress, seconds=seconds
        )
        scores = dict(scores, select=cfg.select, select_score=float(select))
        ranked.append((select, rank, i, scores))
        grids[i] = images[:100]
    ranked.sort(key=lambda r: (r[0], r[1]))
    best_images = grids[ranked[0][2]]
    top = [
        _genome_entry(
            setup,
            t,
            i,
            fid_search=float(t["fid"][i]),
            search_samples=cfg.num_samples,
            rescored=scores,
            generation=int(t["generation"][i]),
        )
        for _, _, i, scores in ranked
    ]
    metric = FITNESS_NAMES[cfg.fitness]  # of fid_search; `rescored` names its own
    files.write_json(workdir / "topk.json", {"metric": metric, "genomes": top})
    seed = 0  # generation 0 starts with the seed genome (quad + uniform bits)
    result = dict(top[0])
    result.update(
        metric=metric,
        method=cfg.strategy,
        space=cfg.space,
        budget_bitops=setup.budget,
        evaluations=int(len(t["fid"])),
        # The work, counted alike with racing on or off (search/racing.py).
        raced_out=int((~fully_scored(t)).sum()),
        samples_scored=int(t["samples"].sum()),
        sample_forwards=int(t["samples"].sum())
        * racing.forwards_per_sample(setup.engine.problem),
        seed_genome={
            "fid_search": float(t["fid"][seed]),
            "total_bitops": float(t["bitops"][seed]),
        },
        search=cfg.to_dict(),
        **provenance(_command()),
    )
    if cfg.objective == "front":  # front.json and front.png
        from tmpq_jax.search.front import write_front

        result["front"] = write_front(setup, t, mask, front, workdir)
    write_genome(workdir / RESULT_FILE, result)
    with clock(seconds, "plots"):
        save_grid(to_uint8(best_images[:100]), workdir / "best_samples.png", nrow=10)
        plots.write_all(setup, t, mask, front, top[0], workdir)
    return result
