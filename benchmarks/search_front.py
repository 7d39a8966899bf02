"""Where searching timesteps pays (issue 22): N searched under total-BitOPs budgets,
and the whole FID-BitOPs front from one search, against single-budget searches.

  python -m benchmarks.search_front --seeds 0,1,2 --protocol short --out-dir DIR
  python -m benchmarks.search_front --shard 3/8 ...   # one of 8 parallel processes
  python -m benchmarks.search_front --merge DIR/parts/*.json --out-dir DIR

A budget `wWaAxN` is the total BitOPs of uniform WwAa over N steps (per-step BitOPs x
N). Every method searches bits {8,7,6,5,4}, from one calibration made in
`--workdir-root/calibration` (a sharded run needs it made first):

* joint: timesteps, N (`timestep_mode=variable`, --min-steps..--max-steps) and bits,
  seeded by the budget's uniform genome on its own quad steps;
* precision_n: bits alone on the quad schedule at N = round(f x the budget's steps)
  for f in --precision-factors (feasible N only); `precision`, derived per budget
  and seed, is the N whose best genome scored best on its fresh samples against the
  *train* split (`select_score`: no test data) and counts the evaluations of every
  N tried;
* fp_steps: the float model at the budget's N, its timesteps searched
  (`space=timesteps_fp`, AutoDiffusion's setting); at 32 x 32 bits a MAC it costs
  16x W8A8 and lies right of every budget: the price of not quantizing;
* uniform: the budget's bits on its quad steps (1 evaluation, seed 0 only);
* front: one NSGA-II search (`objective=front`) under the largest budget; at each
  budget its archive's top-k within the budget are re-scored and selected as a
  single search selects its own.

`evaluations` is per point: a search's own; the front's divided by the budgets it
covers; precision's summed over its N. Rows: method, budget, seed, steps,
total_bitops, fid (the classifier's space: the `fid` fitness's, unseen by the default
teacher), fid_2 (`fid_eval_resnet`, a space no fitness sees) and every fid_eval_*
(pixels among them), precision, recall (10k fresh samples, test split), device,
date, command, wall_s (this process's) and generations_s (the generations' own
seconds, of every process when `resumed`; the rest is setup, compiles and
re-scoring). Rows are written as they finish; rerunning skips units done in any
search_front*.json of --out-dir (searches resume from their last generation). Set
JAX_COMPILATION_CACHE_DIR: every seed runs the same programs.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from benchmarks.common import RESULTS, md_table, provenance, write_json
from benchmarks.search_table import (
    CONFIGS,
    PROTOCOL,
    ROW_PROVENANCE,
    _uniform_row,
    eval_scores,
)
from tmpq_jax import files
from tmpq_jax.config import load_config
from tmpq_jax.errors import UserError
from tmpq_jax.evaluation import FID_NAME
from tmpq_jax.quant import cost, unet_registry
from tmpq_jax.sampling import load_model
from tmpq_jax.search import SearchRunConfig, prepare
from tmpq_jax.search import budget as B
from tmpq_jax.search.config import fitness_label
from tmpq_jax.search.outputs import (
    feasible_mask,
    rescore_and_select,
    top_k_distinct,
    write_outputs,
)
from tmpq_jax.search.run import finished_result, read_log, run_generations
from tmpq_jax.search.space import GenomeSpace

NAME = "search_front.json"
BUDGETS = "w8a8x20,w8a8x10,w6a6x10,w6a6x6,w4a8x4"
METHODS = "uniform,joint,precision_n,fp_steps,front"
FID_2 = "fid_eval_resnet"
RESCORE = ("rescore_top_k", "rescore_samples")
PROTOCOLS = {  # --protocol: the searches' size (the defaults: the paper's)
    "paper": [],
    "short": ["population=24", "generations=8", "num_samples=1000", "rescore_top_k=3"],
    "tiny": ["population=6", "generations=2", "num_samples=136"]
    + ["rescore_top_k=1", "rescore_samples=136", "rescore_batch=136"],
}


def parse_budget(spec: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"w(\d)a(\d)x(\d+)", spec)
    if not m:
        raise UserError(f"--budgets: {spec!r} is not wWaAxN (e.g. w6a6x10).")
    return tuple(map(int, m.groups()))


def run_config(a, method: str, budget: str, seed: int, n: int | None = None):
    """The search config of one unit (`a`: the parsed flags)."""
    w, ab, steps = parse_budget(budget)
    variable = ["timestep_mode=variable", f"num_steps={a.max_steps}"]
    variable.append(f"min_steps={a.min_steps}")
    extra = {
        "uniform": [f"num_steps={steps}"],
        "joint": variable,
        "precision_n": ["space=precision", f"num_steps={n}"],
        "fp_steps": [
            "space=timesteps_fp",
            f"num_steps={steps}",
            "budget_w_bits=32",
            "budget_a_bits=32",
        ],  # fmt: skip
        "front": ["objective=front", *variable],
    }[method]
    keys = [f"budget_w_bits={w}", f"budget_a_bits={ab}", f"budget_steps={steps}"]
    keys += [f"seed_w_bits={w}", f"seed_a_bits={ab}", "candidates=(8,7,6,5,4)"]
    keys += [*PROTOCOLS[a.protocol], *extra, f"seed={seed}"]
    over = [f"search.{k}" for k in keys] + list(a.override)
    if Path(a.workdir_root, "calibration").is_dir():
        over.append(f"calibration={Path(a.workdir_root, 'calibration').resolve()}")
    cd = load_config(str(CONFIGS / "fmnist_search.py"), over)
    return SearchRunConfig.from_configdict(cd)


def precision_steps(a, budget: str, reg) -> list[int]:
    """The fixed N of the precision-only searches: feasible ones only."""
    out = set()
    for f in map(float, a.precision_factors.split(",")):
        n = min(max(round(f * parse_budget(budget)[2]), 1), a.max_steps)
        run = run_config(a, "precision_n", budget, 0, n)
        w, ab, steps = parse_budget(budget)
        floor = B.min_bitops(GenomeSpace.build(run.search, reg), reg)
        if cost.within_budget(floor, B.budget_bitops(reg, w, ab, steps)):
            out.add(n)
    return sorted(out)


def units(a, reg) -> list[tuple]:
    """Every (method, budget, seed, N) to run, with its rough cost in model steps."""
    budgets, seeds = a.budgets.split(","), [int(s) for s in a.seeds.split(",")]
    out = []
    for m in a.methods.split(","):
        for s in [0] if m == "uniform" else seeds:
            if m == "front":
                top = max(budgets, key=lambda b: np.prod(parse_budget(b)))
                out.append(((m, top, s, None), a.max_steps))
                continue
            for b in budgets:
                if m == "precision_n":
                    out += [((m, b, s, n), n) for n in precision_steps(a, b, reg)]
                else:
                    out.append(
                        ((m, b, s, None), a.max_steps if m != "uniform" else 0.1)
                    )
    return out


def check_unit(a, unit: tuple, reg) -> None:
    """Refuses a unit whose space cannot fit its own budget (fp_steps's is the
    float model's at the budget's N, not the budget's bits)."""
    method, budget, seed, n = unit
    s = run_config(a, method, budget, seed, n).search
    total = B.budget_bitops(reg, s.budget_w_bits, s.budget_a_bits, s.budget_steps)
    B.check_budget(GenomeSpace.build(s, reg), reg, total)


def shard(work: list[tuple], spec: str | None) -> list[tuple]:
    """This process's units of `--shard I/K`: greedy by cost (longest first)."""
    if not spec:
        return [u for u, _ in work]
    i, k = map(int, spec.split("/"))
    load, mine = [0.0] * k, []
    for u, c in sorted(work, key=lambda w: -w[1]):
        j = int(np.argmin(load))
        load[j] += c
        mine += [u] if j == i else []
    return mine


def _search(run: SearchRunConfig, wd: Path):
    """(setup, result) of a search, run or resumed, or read back when finished."""
    setup = prepare(run, wd, progress=False)
    res = finished_result(setup, wd)
    if res is None:
        res = write_outputs(setup, run_generations(setup, wd, False), wd, False)
    return setup, res


def _scores(s: dict) -> dict:
    keep = {k: s.get(k) for k in ("fid", "precision", "recall", "select_score")}
    return {**keep, "fid_2": s.get(FID_2), **eval_scores(s), "rescored": s}


def front_rows(setup, res: dict, wd: Path, budgets: list[str]) -> list[dict]:
    """Per budget: the front search's top-k within it, re-scored, the best kept."""
    t, k = dict(np.load(wd / "archive.npz")), setup.run.search.rescore_top_k
    rows = []
    for b in budgets:
        budget = B.budget_bitops(setup.registry, *parse_budget(b))
        mask = feasible_mask(t, budget)
        if not mask.any():
            continue
        scored = []
        for rank, i in enumerate(top_k_distinct(t, mask, k)):
            report, _, select = rescore_and_select(setup, t["genomes"][i], False)
            scored.append((select, rank, i, dict(report, select_score=float(select))))
        _, _, i, s = min(scored, key=lambda r: r[:2])
        n = int(t["num_steps"][i])
        rows.append(dict(budget=b, budget_bitops=budget, steps=n,
                         timesteps=np.unique(t["timesteps"][i]).tolist()[:n],
                         total_bitops=float(t["bitops"][i]),
                         fid_search=float(t["fid"][i]), **_scores(s)))  # fmt: skip
    total = res["evaluations"]  # counted alike: one search's over its points
    for r in rows:
        r.update(evaluations=total / len(rows), evaluations_total=total,
                 front_budgets=len(rows), front_points=res["front"]["points"])  # fmt: skip
    return rows


def run_unit(a, unit: tuple, root: Path) -> list[dict]:
    method, budget, seed, n = unit
    run, t0 = run_config(a, method, budget, seed, n), time.perf_counter()
    if method == "uniform":
        setup = prepare(run, root / budget / "baselines", progress=False)
        u = _uniform_row(setup, setup.evaluator)
        ts = setup.space.decode(setup.space.seed).timesteps
        rows = [dict(steps=len(ts), timesteps=np.asarray(ts).tolist(), evaluations=1,
                     total_bitops=u["bitops"], fid_search=u["fid_2k"],
                     **_scores(u["rescored"]))]  # fmt: skip
    else:
        tag = f"{method}_n{n}" if n else method
        wd = root / (f"front_{budget}" if method == "front" else budget)
        wd = wd / f"{tag}_s{seed}"
        resumed = bool(read_log(wd))  # then generations_s counts earlier processes too
        setup, res = _search(run, wd)
        if method == "front":
            rows = front_rows(setup, res, wd, a.budgets.split(","))
        else:
            rows = [dict(steps=len(res["timesteps"]), timesteps=res["timesteps"],
                         total_bitops=res["total_bitops"], layers=res["layers"],
                         fid_search=res["fid_search"], evaluations=res["evaluations"],
                         **_scores(res["rescored"]))]  # fmt: skip
        if method == "precision_n":
            rows[0]["grid"] = precision_steps(a, budget, setup.registry)
        log = read_log(wd)  # the rest of wall_s: setup, compiles, re-scoring
        gens = round(sum(g["wall_s"] for g in log), 2)
        for r in rows:
            r.update(workdir=str(wd), generations_s=gens, resumed=resumed)
    s, prov = run.search, provenance()
    for r in rows:
        r.setdefault("budget", budget)
        total = B.budget_bitops(setup.registry, *parse_budget(budget))
        r.setdefault("budget_bitops", total)
        r.update(method=method, seed=seed, unit="/".join(map(str, unit)), fitness=fitness_label(s),
                 protocol={k: getattr(s, k) for k in (*PROTOCOL, *RESCORE)}, bits="8,7,6,5,4",
                 wall_s=round(time.perf_counter() - t0, 2),
                 **{k: prov[k] for k in ROW_PROVENANCE})  # fmt: skip
    return rows


def with_precision(rows: list[dict]) -> list[dict]:
    """The rows plus `precision`, per (budget, seed, protocol): the precision_n row
    of the lowest select_score (train split, fresh samples) once every N is in."""
    rows = [r for r in rows if r["method"] != "precision"]
    groups: dict = {}
    for r in rows:
        if r["method"] == "precision_n":
            key = (r["budget"], r["seed"], json.dumps(r["protocol"]))
            groups.setdefault(key, []).append(r)
    for rs in groups.values():
        if {r["steps"] for r in rs} != set(rs[0]["grid"]):
            continue
        best = min(rs, key=lambda r: r["select_score"])
        chosen = {str(r["steps"]): r["select_score"] for r in rs}
        evals = sum(r["evaluations"] for r in rs)
        rows.append({**best, "method": "precision", "evaluations": evals,
                     "chosen_by_select_score": chosen})  # fmt: skip
    return rows


def save(rows: list[dict], out_dir, name: str = NAME, parts=None) -> Path:
    """The rows; a merge's top-level provenance is its last part's (the device that
    measured, not the machine that merged), every part listed once."""
    head = parts[-1] if parts else provenance()
    payload = {**head, "metric": FID_NAME, "rows": with_precision(rows)}
    if parts:
        payload["parts"] = list({json.dumps(q, sort_keys=True): q for q in parts}.values())
    return write_json(name, payload, out_dir)


def merge(paths: list[str], out_dir) -> Path:
    """One file from parts; a unit measured again replaces the earlier. Its parts:
    every command its rows were measured by (a file resumed across calls names
    only its last in its top level), at its first date."""
    rows, parts = {}, []
    for p in paths:
        d = json.loads(Path(p).read_text())
        parts += d.get("parts", [{k: d[k] for k in ROW_PROVENANCE}])
        for r in d["rows"]:
            if r["method"] != "precision":  # rows of before the pixel key gain it
                rows[(r["unit"], r["budget"])] = {**eval_scores(r["rescored"]), **r}
    first: dict = {}
    for r in sorted(rows.values(), key=lambda r: r["date"]):
        first.setdefault((r["device"], r["command"]), r["date"])
    parts += [dict(device=d, date=t, command=c) for (d, c), t in first.items()]
    return save(list(rows.values()), out_dir, NAME, parts)


# -- the table and the figure (benchmarks/tables.py renders them into docs/) -------
LABELS = {"uniform": "uniform bits, the budget's quad steps",
          "fp_steps": "full precision at the budget's N, searched timesteps (over it)",
          "precision": "precision-only search at the best fixed N (quad steps)",
          "joint": "joint search, N variable",
          "front": "one NSGA-II front, all budgets"}  # fmt: skip


def _groups(d: dict):
    budgets = sorted({r["budget"]: r["budget_bitops"] for r in d["rows"]}.items(),
                     key=lambda b: -b[1])  # fmt: skip
    for m in LABELS:
        yield m, [(b, [r for r in d["rows"] if r["method"] == m and r["budget"] == b])
                  for b, _ in budgets]  # fmt: skip


def _budget(b: str, d: dict) -> str:
    w, a, n = parse_budget(b)
    total = next(r["budget_bitops"] for r in d["rows"] if r["budget"] == b)
    return f"W{w}A{a} x{n} ({total / 1e9:.1f} GBitOPs)"


def _cell(rs: list[dict], key: str) -> str:
    v = [r[key] for r in rs if r.get(key) is not None]
    if not v:
        return "—"
    steps = sorted({r["steps"] for r in rs})
    n = f"N {steps[0]}" + (f"–{steps[-1]}" if len(steps) > 1 else "")
    if len(v) == 1:
        return f"{v[0]:.2f} ({n})"
    spread = f"{np.std(v, ddof=1):.2f} [{min(v):.2f}–{max(v):.2f}]"
    return f"{np.mean(v):.2f} ± {spread} ({n})"


SPACES = (
    ("fid", "FID clf."),
    ("fid_2", "FID ResNet"),
    ("fid_eval_pixels", "FID pixels"),
)


def _spaces(d: dict) -> list[tuple[str, str]]:
    """(key, label) of each space the rows hold. The classifier's is seen by every
    fitness but the pixels-only teacher (`fid` and `ensemble` score in it, a teacher
    with a feature term matches in it); ResNet's and the pixels' FID by none."""
    fitness = {r.get("fitness", "fid") for r in d["rows"]}
    out = []
    for key, name in SPACES:
        if any(r.get(key) is not None for r in d["rows"]):
            seen = key == "fid" and fitness != {"teacher_pixels"}
            out.append((key, f"{name} ({'seen by the fitness' if seen else 'unseen'})"))
    return out


def table(d: dict) -> str:
    out = []
    for key, space in _spaces(d):
        rows = []
        for m, by_budget in _groups(d):
            if any(rs for _, rs in by_budget):
                evals = {f"{r['evaluations']:g}" for _, rs in by_budget for r in rs}
                seeds = {r["seed"] for _, rs in by_budget for r in rs}
                rows.append([LABELS[m], len(seeds), *(_cell(rs, key) for _, rs in by_budget),
                             "/".join(sorted(evals, key=float))])  # fmt: skip
        budgets = [_budget(b, d) for b, _ in next(_groups(d))[1]]
        head = [space, "seeds", *budgets, "evaluations / point"]
        out.append(md_table(head, rows))
    devices = ", ".join(sorted({r["device"] for r in d["rows"]}))
    dates = sorted({r["date"][:10] for r in d["rows"]})
    when = dates[0] + (f" to {dates[-1]}" if len(dates) > 1 else "")
    protos = "; ".join(sorted({json.dumps(r["protocol"]) for r in d["rows"]}))
    fits = ", ".join(sorted({r.get("fitness", "fid") for r in d["rows"]}))
    missing = [LABELS[m] for m, by in _groups(d) if not any(rs for _, rs in by)]
    num = "/".join(sorted({str(r["rescored"]["num_samples"]) for r in d["rows"]}))
    return "\n\n".join(out) + (
        f"\n\n*Mean ± standard deviation [min–max] over seeds, {num} fresh samples "
        "against the test split; N: the steps of the genomes. Budget WwAa xN: total "
        f"BitOPs of uniform WwAa over N steps. Protocol: `{protos}`. {devices}, {when};"
        f" `python -m benchmarks.search_front` → `benchmarks/results/{NAME}`. Fitness:"
        f" {fits}.*" + (f"\n\nNot yet run: {'; '.join(missing)}." if missing else "")
    )


def figure(d: dict, path: Path) -> None:
    """FID against total BitOPs in each space: per method and budget, the mean
    over seeds with min-max bars; the budgets dotted."""
    spaces = _spaces(d)
    fig = Figure(figsize=(5 * len(spaces), 4.8))
    axes = fig.subplots(1, len(spaces), squeeze=False)[0]
    for ax, (key, space) in zip(axes, spaces, strict=True):
        for c, (m, by_budget) in enumerate(_groups(d)):
            pts = [(np.mean([r["total_bitops"] for r in rs]) / 1e9,
                    np.array([r[key] for r in rs]))
                   for _, rs in by_budget if rs and all(r.get(key) for r in rs)]  # fmt: skip
            if pts:
                x, y = [p[0] for p in pts], np.array([v.mean() for _, v in pts])
                err = [y - [v.min() for _, v in pts], [v.max() for _, v in pts] - y]
                ax.errorbar(x, y, yerr=err, fmt="o-", ms=4, capsize=3, c=f"C{c}",
                            label=LABELS[m])  # fmt: skip
        budgets = sorted({r["budget_bitops"] / 1e9 for r in d["rows"]})
        for b in budgets:
            ax.axvline(b, ls=":", c="0.6", lw=0.8)
        ax.set(xscale="log", yscale="log", ylabel=space,
               xlabel="total GBitOPs per image (all steps); dotted: the budgets")  # fmt: skip
        ax.set_xticks(budgets, [f"{b:.0f}" for b in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    files.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--budgets", default=BUDGETS, help="wWaAxN,...")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--protocol", default="paper", choices=sorted(PROTOCOLS))
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--precision-factors", default="0.5,1,2")
    ap.add_argument("--shard", default=None, help="I/K: this process's share")
    ap.add_argument("--workdir-root", default="runs/search_front")
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--figure", default=None, help="also draw the figure here")
    ap.add_argument("--merge", nargs="*", help="merge part files into one")
    a = ap.parse_args()
    if a.merge:
        out = merge(a.merge, a.out_dir)
    else:
        root = Path(a.workdir_root)
        name = f"search_front_{a.shard.replace('/', 'of')}.json" if a.shard else NAME
        out = Path(a.out_dir or RESULTS) / name
        rows = json.loads(out.read_text())["rows"] if out.exists() else []
        rows = [r for r in rows if r["method"] != "precision"]
        parts = out.parent.glob("search_front*.json")  # units any process finished
        done = {r["unit"] for f in parts for r in json.loads(f.read_text())["rows"]}
        reg = unet_registry(load_model().config)
        work = units(a, reg)
        for u, _ in work:  # refused before any work
            check_unit(a, u, reg)
        if not (root / "calibration").is_dir():  # one for every unit, made once
            if a.shard:
                raise SystemExit(f"{root}/calibration: make it in one call first")
            prepare(run_config(a, "uniform", a.budgets.split(",")[0], 0), root, False)
        for unit in shard(work, a.shard):
            if "/".join(map(str, unit)) in done:
                continue
            rows += run_unit(a, unit, root / a.protocol)
            for r in rows[-1:]:
                print(f"{r['unit']}: N {r['steps']} fid {r['fid']:.3f} fid_2 "
                      f"{r['fid_2']} ({r['wall_s']} s)", flush=True)  # fmt: skip
            out = save(rows, out.parent, out.name)
    if a.figure:
        figure(json.loads(Path(out).read_text()), Path(a.figure))
    print(out)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad budget, N range or setting: one line
        raise SystemExit(f"error: {e}") from None
