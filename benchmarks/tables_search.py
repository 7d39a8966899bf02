"""The search table's renderings: every (model, budget, fitness) group in every
evaluation space (docs/results.md), and the README's table, the W6A6 genomes
re-scored on the CPU in every space."""

import json

from benchmarks.common import load_result as _load
from benchmarks.common import md_table

SEEDS = (0, 1, 2)  # the table's seeds for every searched method


def _src(d: dict, name: str, sep: str = ",") -> str:
    """A table's footer: device, date, the command (every part's) and the file."""
    parts = d.get("parts", [d])
    cmds = "; ".join(f"`{p['command']}`" for p in parts)
    dates = sorted({p.get("date", d["date"])[:10] for p in parts})
    date = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return f"*{d['device']}, {date}{sep} {cmds} → `benchmarks/results/{name}`*"


_LABELS = {"fp": "full precision (W32A32), {steps}",
           "fp_uniform": "full precision, uniform steps (the best fixed schedule)",
           "timesteps_fp": "full precision, searched timesteps",
           "uniform": "uniform {w} + {steps} (the seed genome)",
           "precision": "precision-only search ({steps} fixed)",
           "timesteps": "timestep-only search (uniform {w} fixed)",
           "random": "random search, same evaluations",
           "joint": "**joint search**",
           "joint_race": "joint search, racing (every candidate on a prefix of the samples, the best on all: the protocol line)"}  # fmt: skip


def _mean_std(values: list[float], seeds: bool = True) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.2f} ± {sd:.2f}" + (f" ({len(values)} seeds)" if seeds else "")


# Reported on 10k fresh samples against the test split. The classifier's FID is
# the `fid` fitness's own space; the others no fitness ever sees.
_SCORES = (("fid_10k", "FID clf."), ("fid_eval_resnet", "FID ResNet"),
           ("fid_eval_simclr", "FID SimCLR"), ("fid_pixels", "FID pixels"),
           ("precision", "P"), ("recall", "R"))  # fmt: skip
_FITNESSES = ("fid", "teacher", "teacher_pixels", "ensemble")


def _score(r: dict, key: str):
    return r.get(key, (r.get("rescored") or {}).get(key))


def _cells(rs: list[dict], key: str) -> str:
    vals = [v for r in rs if (v := _score(r, key)) is not None]
    return _mean_std(vals, seeds=False) if len(vals) == len(rs) else "—"


def _groups(d: dict):
    """(model, budget, rows) of the table, the UNet first."""
    for model in ("unet", "dit"):
        for budget in ("w6a6", "w4a8"):
            rows = [r for r in d["rows"] if r.get("model", "unet") == model
                    and r["budget"] == budget]  # fmt: skip
            if rows:
                yield model, budget, rows


def search_table(d: dict) -> str:
    out = []
    for model, budget, rows in _groups(d):
        w = budget.upper()
        cands = "{8,7,6,5}" if budget == "w6a6" else "{8,7,6,5,4}"
        # the float search's budget is its own cost, not the table's
        gbitops = next(r for r in rows if r["method"] != "timesteps_fp")
        gbitops = gbitops["budget_bitops"] / 1e9
        what = "UNet, DDIM" if model == "unet" else "DiT, Euler, guidance 1.5"
        steps = "quad steps" if model == "unet" else "the shifted grid"  # the seed's
        out.append(f"**{what}.** Budget: total BitOPs of uniform {w} at 10 steps "
                   f"({gbitops:.1f} GBitOPs per image), bits {cands}.")  # fmt: skip
        cells, missing = [], []
        other = {r.get("fitness", "fid") for r in rows} - set(_FITNESSES)
        for fitness in [*_FITNESSES, *sorted(other)]:  # teacher_w0.5 too
            for method in _LABELS:
                rs = [r for r in rows if r["method"] == method
                      and r.get("fitness", "fid") == fitness]  # fmt: skip
                if not rs and (fitness != "fid" or method not in _SEARCHED):
                    continue  # only the fid fitness's table is meant whole
                have = {r["seed"] for r in rs}
                if method not in ("fp", "fp_uniform", "uniform") and (
                    lack := [s for s in SEEDS if s not in have]
                ):
                    missing.append(
                        f"{method}, {fitness} (seed {', '.join(map(str, lack))})"
                    )
                if not rs:
                    continue
                label = _LABELS[method].format(w=w, steps=steps)
                cells.append([label, fitness, len(rs)])
                cells[-1] += [_cells(rs, k) for k, _ in _SCORES]
                cells[-1] += [_mean_std([r["bitops"] / 1e9 for r in rs], False)]
                cells[-1].append(rs[0]["evaluations"])
        head = ["method", "fitness", "seeds", *(h for _, h in _SCORES)]
        out += ["", md_table(head + ["GBitOPs", "evaluations"], cells)]
        if missing:
            out += ["", f"Not yet run: {'; '.join(missing)}."]
        protocols: dict[str, set] = {}  # protocol -> the (method, fitness) rows
        for r in rows:
            if "protocol" in r and r["method"] not in ("fp", "fp_uniform", "uniform"):
                who = f"{r['method']} / {r.get('fitness', 'fid')}"
                protocols.setdefault(json.dumps(r["protocol"]), set()).add(who)
        for p, who in sorted(protocols.items()):
            out += ["", f"Protocol of {', '.join(sorted(who))}: `{p}`."]
        out.append("")
    legend = (
        "*Mean ± standard deviation over seeds of each method's best genome, 10k "
        "fresh samples against the test split. FID clf. is the FMNIST "
        "classifier's space, which the `fid` fitness optimizes (on train "
        "statistics) and the `teacher` fitness's feature term reads; ResNet (a classifier of another design) and SimCLR (trained"
        " without labels) are evaluation nets no fitness sees; P and R: k-NN "
        "precision and recall in ResNet space. — : not scored in that space (rows"
        " searched before the evaluation nets existed and not yet re-scored).*"
    )
    return "\n".join(out) + "\n" + legend + "\n\n" + _search_sources(d)


_MODEL = {"unet": "", "dit": "DiT "}


def _search_sources(d: dict) -> str:
    """The table's footer: which device ran which rows, the dates, the commands
    (rows carry their own; a table from before they did names its parts')."""
    rows = d["rows"]
    if not all("command" in r for r in rows):
        return _src(d, "search_table.json", ";")
    by_device: dict[str, dict] = {}
    for r in rows:
        key = (_MODEL[r.get("model", "unet")] + r["budget"].upper(), r["method"])
        key += (r.get("fitness", "fid"),)
        by_device.setdefault(r["device"], {}).setdefault(key, []).append(r["seed"])
    # the device that ran most rows is "the rest"; the others list their rows
    order = sorted(by_device, key=lambda dev: -sum(map(len, by_device[dev].values())))
    devices = order[0] if len(order) == 1 else f"{order[0]}: every row but these"
    for dev in order[1:]:
        runs = sorted(by_device[dev].items())
        devices += f"; {dev}: " + ", ".join(
            f"{b} {m}{'' if f == 'fid' else ' ' + f} (seed {', '.join(map(str, sorted(seeds)))})"
            for (b, m, f), seeds in runs
        )
    dates = sorted({r["date"][:10] for r in rows})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (f"*{devices}; {when}; each row one `python -m benchmarks.search_table "
            "--model MODEL --budget B --methods M --seeds S [--override "
            "search.fitness=F]` (the JSON gives each "
            "row's device, command and date, or where its `provenance_note` says "
            "so, its part file's date)" + _rescore_source(rows) +
            " → `benchmarks/results/search_table.json`*")  # fmt: skip


def _rescore_source(rows: list[dict]) -> str:
    """Rows scored again in the evaluation spaces after their search."""
    rs = [r for r in rows if "rescore_command" in r]
    if not rs:
        return ""
    devices = ", ".join(sorted({r["rescore_device"] for r in rs}))
    dates = ", ".join(sorted({r["rescore_date"][:10] for r in rs}))
    cmds = "; ".join(f"`{c}`" for c in sorted({r["rescore_command"] for r in rs}))
    return (f"; {len(rs)} searched rows scored again in every space on the same "
            f"noise ({devices}, {dates}): {cmds}")


_SUMMARY = {"fp": "full precision, quad steps",
            "fp_uniform": "full precision, uniform steps",
            "uniform": "uniform bits (the budget's), quad steps",
            "precision": "precision-only search (quad steps)",
            "timesteps": "timestep-only search (uniform bits)",
            "random": "random search, same evaluations",
            "joint": "**joint search** (timesteps + bits)"}  # fmt: skip
_SEARCHED = ("precision", "timesteps", "random", "joint")
def render_eval_cpu() -> str:
    """W6A6 genomes of the fid fitness against full precision in every space, on
    the fewer fresh samples a CPU re-scoring affords (search_table_eval_cpu.json)."""
    if not (d := _load("search_table_eval_cpu.json")):
        return "Not yet measured: `benchmarks.rescore_rows` on the CPU."
    rows = [r for r in d["rows"] if r["budget"] == "w6a6"]
    cells = []
    for m in ("fp", "fp_uniform", "uniform", "precision", "joint"):
        if rs := [r for r in rows if r["method"] == m]:
            cells.append([_SUMMARY[m], len(rs), *(_cells(rs, k) for k, _ in _SCORES)])
    n = rows[0]["rescored"]["num_samples"]
    devices = sorted({r.get("rescore_device", r["device"]) for r in rows})
    return md_table(
        ["W6A6 budget, 10 DDIM steps", "seeds", *(h for _, h in _SCORES)], cells
    ) + (
        f"\n\n*{n} fresh samples per genome against the test split (FIDs on {n} "
        "samples sit above 10k-sample ones; compare within this table). The searched "
        "genomes are those of the GPU table (fid fitness, paper protocol), re-scored on "
        f"{', '.join(devices)} with `python -m benchmarks.rescore_rows`; "
        "`benchmarks/results/search_table_eval_cpu.json`*"
    )
