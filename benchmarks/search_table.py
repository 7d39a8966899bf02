"""The search results table: every method at the same BitOPs budget, re-scored on
fresh samples (TMPQ-DM re-scores its top 10).

  python -m benchmarks.search_table --budget w6a6 --seeds 0 \
      --methods fp,uniform,precision,timesteps,random,joint --out-dir DIR
  python -m benchmarks.search_table --merge DIR1/search_table.json DIR2/...

`--model dit` searches the shipped DiT (configs/fmnist_dit_search.py: Euler over
the shifted grid, guidance 1.5) into `search_table_dit_<budget>.json`.
Rows: full precision 10-step quad; uniform bits + quad (the seed genome); the
precision-only search (quad steps fixed); the timestep-only search (uniform bits
fixed); random search with the same number of evaluations; the joint search;
`timesteps_fp`, the float model with its timesteps searched (AutoDiffusion's
setting, at full precision's BitOPs).
Budgets: `w6a6` (the paper's, bits {8,7,6,5}) and `w4a8` (bits {8,7,6,5,4}).
Each search runs `tmpq search` in `--workdir-root/<model>/<budget>/<method>_s<seed>`
(resumable) from `configs/fmnist_search.py` plus `--override`s. Rerunning the
same command keeps the rows already in `--out-dir` and runs only the rest.
Set `JAX_COMPILATION_CACHE_DIR`: every seed of a method runs the same programs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import RESULTS, provenance, write_json
from tmpq_jax.config import load_config
from tmpq_jax.diffusion import uniform_timesteps
from tmpq_jax.evaluation import FID_NAME, Evaluator
from tmpq_jax.metrics import fid
from tmpq_jax.quant import cost
from tmpq_jax.search import SearchRunConfig, prepare, search
from tmpq_jax.search.config import fitness_label
from tmpq_jax.search.outputs import rescore, rescore_images
from tmpq_jax.search.run import read_log

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The searched model: the shipped UNet (DDIM) or DiT (flow matching, CFG 1.5).
MODELS = {"unet": "fmnist_search.py", "dit": "fmnist_dit_search.py"}
BUDGETS = {
    "w6a6": ["search.budget_w_bits=6", "search.budget_a_bits=6"],
    "w4a8": [
        "search.candidates=(8,7,6,5,4)",
        "search.budget_w_bits=4",
        "search.budget_a_bits=8",
        "search.seed_w_bits=4",
        "search.seed_a_bits=8",
    ],
}
ROW_PROVENANCE = ("device", "date", "command")
BASELINES = ("fp", "fp_uniform", "uniform")  # one genome each, seed 0 only
PROTOCOL = ("population", "generations", "num_samples", "race_samples", "race_keep")
METHODS = {
    "joint": [],
    "precision": ["search.space=precision"],
    "timesteps": ["search.space=timesteps"],
    "random": ["search.strategy=random"],
    # the float model, its timesteps searched (the budget: its own 32-bit cost)
    "timesteps_fp": [
        "search.space=timesteps_fp",
        "search.budget_w_bits=32",
        "search.budget_a_bits=32",
    ],
    # racing (issue 26): every candidate on 500 samples, the best quarter on all
    "joint_race": ["search.race_samples=500"],
    "joint_penalty": ["search.constraint=penalty"],
}


def _run_config(
    budget: str, method: str, seed: int, overrides, model: str = "unet"
) -> SearchRunConfig:
    extra = METHODS.get(method, [])
    cd = load_config(
        str(CONFIGS / MODELS[model]),
        [*BUDGETS[budget], *extra, f"search.seed={seed}", *overrides],
    )
    return SearchRunConfig.from_configdict(cd)


def _fp_row(setup, ev: Evaluator, schedule: str = "seed") -> dict:
    """Full precision on the seed's steps (quad, or a flow model's shifted grid)
    or, `schedule="uniform"`, on DDIM's uniform steps (the best fixed 10-step
    schedule in fp_baseline.json), with the search's sampler (guidance and labels
    included): on the search's noise and on fresh noise."""
    lm, cfg, a = setup.lm, setup.run.search, setup.assets
    ts = setup.space.decode(setup.space.seed).timesteps
    if schedule == "uniform":
        ts = jax.numpy.asarray(
            uniform_timesteps(cfg.num_steps, lm.diffusion.num_timesteps)
        )
    sampler = setup.engine.problem.sampler
    fn = jax.jit(
        lambda x, y: sampler(lm.model_fn(lm.params), x, ts, a.sched, y, a.guidance)
    )
    images = np.clip(np.asarray(fn(a.noise, a.labels)), -1, 1)
    mu, sigma = ev.stats["mu_test"], ev.stats["sigma_test"]
    fid_2k = fid(ev.net.extract(images).features, mu, sigma)
    scores = ev.score(rescore_images(setup, fn))
    macs = float(np.sum(setup.registry.macs))  # per step: CFG's forwards counted
    return {
        "ts": np.asarray(ts),
        "fid_2k": float(fid_2k),
        "fid_10k": scores["fid"],
        "rescored": scores,
        "bitops": 32 * 32 * macs * cfg.num_steps,
        "size_bits": 32.0 * float(np.sum(setup.registry.params)),
    }


def _uniform_row(setup, ev: Evaluator) -> dict:
    """The seed genome (quad steps, uniform bits): its search fitness and rescore."""
    seed = jax.numpy.asarray(setup.space.seed)
    fid_2k = float(jax.jit(setup.engine.problem.fid)(setup.assets, seed))
    scores, _ = rescore(setup, ev, setup.space.seed, progress=False)
    d = setup.space.decode(seed)
    return {
        "ts": np.asarray(d.timesteps),
        "fid_2k": fid_2k,
        "fid_10k": scores["fid"],
        "rescored": scores,
        "bitops": float(cost.total_bitops(d.bits, setup.registry, d.num_steps)),
        "size_bits": float(cost.model_size_bits(d.bits, setup.registry)),
    }


def eval_scores(scores: dict) -> dict:
    """One `fid_eval_<space>` key per evaluation space of a re-scoring: the nets'
    and pooled pixels' (`fid_pixels` in the evaluator's report)."""
    out = {k: v for k, v in scores.items() if k.startswith("fid_eval_")}
    if "fid_pixels" in scores:
        out["fid_eval_pixels"] = scores["fid_pixels"]
    return out


def run_row(method, budget, seed, root: Path, overrides, model="unet") -> dict:
    # DDIM's uniform steps mean nothing to a flow model
    if method == "fp_uniform" and model != "unet":
        raise SystemExit("fp_uniform is DDIM's uniform schedule: for the DiT use fp.")
    if method in BASELINES:  # no search: one row whatever the fitness, its fid_2k a FID
        overrides = [*overrides, "search.fitness=fid"]
    run = _run_config(budget, method, seed, overrides, model)
    t0 = time.perf_counter()
    budget_total = None
    if method in BASELINES:
        setup = prepare(run, root / budget / "baselines", progress=False)
        ev = setup.evaluator  # the fitness net's space and the evaluation spaces
        if method == "uniform":
            r = _uniform_row(setup, ev)
        else:
            r = _fp_row(setup, ev, "uniform" if method == "fp_uniform" else "seed")
        budget_total = setup.budget
        r.update(timesteps=[int(t) for t in r.pop("ts")])
        r.update(evaluations=1)
    else:
        wd = root / budget / f"{method}_s{seed}"
        before = len(read_log(wd))  # generations an earlier, cut-off call ran
        res = search(run, wd, progress=False)
        r = {
            "fid_2k": res["fid_search"],
            "fid_10k": res["rescored"]["fid"],
            "rescored": res["rescored"],
            "bitops": res["total_bitops"],
            "size_bits": res["size_bits"],
            "timesteps": res["timesteps"],
            "evaluations": res["evaluations"],
            "layers": res["layers"],
            "workdir": str(wd),
            "generations_logged_before": before,  # > 0: resumed, wall_s is the rest
            # this call's generations (the first two compile): wall_s minus their
            # sum is setup, the teacher run, calibration and re-scoring
            "generation_wall_s": [g["wall_s"] for g in read_log(wd)[before:]],
            "seconds": res.get("seconds"),  # prepare, generations, outputs
        }
        budget_total = res["budget_bitops"]
    prov = provenance()
    scores = r.get("rescored") or {}
    r.update(
        fitness=fitness_label(run.search),
        fid=scores.get("fid"),
        **eval_scores(scores),
        precision=scores.get("precision"),
        recall=scores.get("recall"),
    )
    s = run.search  # the protocol: reduced ones (the DiT's on a GPU call) differ
    r.update(
        protocol={k: getattr(s, k) for k in PROTOCOL},
        model=model,
        method=method,
        budget=budget,
        budget_bitops=budget_total,
        seed=seed,
        wall_s=round(time.perf_counter() - t0, 2),
        **{k: prov[k] for k in ROW_PROVENANCE},  # parts may hold rows of many runs
    )
    return r


def merge(paths: list[str], out_dir: str | None) -> Path:
    """One table from part files (a merged table may be one of them: its parts are
    kept); a row measured again (same model, budget, method, seed, fitness) replaces
    the earlier.
    A row without its own device, date and command (written before rows carried
    them) takes its part file's, unless that file is itself a merge of several
    (whose top-level provenance is only its last part's)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = {}
    for p in parts:
        fill = len(p.get("parts", [p])) == 1
        for r in p["rows"]:
            r = {**{k: p[k] for k in ROW_PROVENANCE}, **r} if fill else r
            if "fid_eval_resnet" in r:  # rows written before pixels had a key
                r = {**r, **eval_scores(r.get("rescored") or {})}
            key = (r.get("model", "unet"), r["budget"], r["method"], r["seed"])
            key += (r.get("fitness", "fid"),)
            rows.pop(key, None)
            rows[key] = r
    payload = {
        **parts[-1],
        "rows": list(rows.values()),
        # once each: a table merged with its own re-scoring repeats its parts
        "parts": list(
            {
                json.dumps(q2 := {k: q[k] for k in ROW_PROVENANCE}): q2
                for p in parts
                for q in p.get("parts", [p])
            }.values()
        ),
    }
    return write_json("search_table.json", payload, out_dir or RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="fp,uniform,precision,timesteps,random,joint")
    ap.add_argument("--budget", default="w6a6", choices=sorted(BUDGETS))
    ap.add_argument("--model", default="unet", choices=sorted(MODELS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workdir-root", default="runs/search_table")
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--merge", nargs="*", help="merge part files into one")
    args = ap.parse_args()
    if args.merge:
        print(merge(args.merge, args.out_dir))
        return
    name = f"search_table_{args.budget}.json"
    if args.model != "unet":
        name = f"search_table_{args.model}_{args.budget}.json"
    out = Path(args.out_dir or RESULTS) / name
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    run = _run_config(args.budget, "joint", 0, args.override, args.model)
    done = {
        (r["method"], r["seed"])
        for r in rows
        if r["method"] in BASELINES or r.get("fitness", "fid") == fitness_label(run.search)
    }
    root = Path(args.workdir_root) / args.model
    for method in args.methods.split(","):
        seeds = [0] if method in BASELINES else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            if (method, seed) in done:
                continue
            r = run_row(method, args.budget, seed, root, args.override, args.model)
            print(
                f"{args.budget} {method:10s} seed {seed}: fid_2k {r['fid_2k']:.3f} "
                f"fid_10k {r['fid_10k']:.3f} bitops {r['bitops'] / 1e9:.1f}G "
                f"({r['wall_s']} s)",
                flush=True,
            )
            rows.append(r)
            payload = {**provenance(), "metric": FID_NAME, "rows": rows}
            write_json(name, payload, args.out_dir)


if __name__ == "__main__":
    main()
