"""Renders the measured tables of the README and docs/ from the JSON in
benchmarks/results/ (no figure typed by hand).

python -m benchmarks.tables          # prints every block as markdown
python -m benchmarks.tables --docs   # rewrites the blocks between their markers
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.common import load_result as _load
from benchmarks.tables_perf import render_perf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
PERF_DOC = ROOT / "docs" / "performance.md"
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary:begin -->", "<!-- summary:end -->"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
QUANT_BEGIN, QUANT_END = "<!-- quant_uniform:begin -->", "<!-- quant_uniform:end -->"
PERF_BEGIN, PERF_END = "<!-- perf:begin -->", "<!-- perf:end -->"


def _src(d: dict, name: str) -> str:
    return f"*{d['device']}, {d['date'][:10]}, `{d['command']}` → `benchmarks/results/{name}`*"


def fp_model_table(d: dict) -> str:
    s = d["sampling"]
    lines = [
        "| parameters | training | GPU wall time | DDIM 100 steps, batch 1000: fp32 | bf16 |",
        "| --- | --- | --- | --- | --- |",
        f"| {d['param_count']:,} | {d['training_steps']:,} steps x {d['training_batch_size']} "
        f"| {d['training_gpu_wall_s'] / 60:.1f} min ({d['training_device']}) "
        f"| {s['by_dtype']['float32']['images_per_s']:,.0f} img/s "
        f"| {s['by_dtype']['bfloat16']['images_per_s']:,.0f} img/s |",
    ]
    return "\n".join(lines) + "\n\n" + _src(d, "fp_model.json")


def fp_baseline_table(d: dict) -> str:
    floor = {f["num_samples"]: f for f in d["floor"]}
    n = d["rows"][0]["num_samples"]
    lines = [
        "| sampler | steps | schedule | FID (FMNIST clf.) | x floor | KID | IS | min class |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d["rows"]:
        ratio = r["fid"] / floor[n]["mean"] if n in floor else float("nan")
        lines.append(
            f"| {r['sampler'].upper()} | {r['steps']} | {r['schedule']} | {r['fid']:.3f} "
            f"| {ratio:.1f} | {r['kid']:.4f} | {r['is']:.2f} "
            f"| {100 * r['min_class_fraction']:.1f}% |"
        )
    for size, f in sorted(floor.items()):
        lines.append(
            f"| real train images (floor) | | {size} samples | {f['mean']:.3f} ± {f['std']:.3f} "
            "| 1.0 | | | |"
        )
    head = f"{n} samples per row, seed 0, against the 10k test-set statistics.\n\n"
    return head + "\n".join(lines) + "\n\n" + _src(d, "fp_baseline.json")


_LABELS = {
    "fp": "full precision (W32A32), quad steps",
    "uniform": "uniform {w} + quad steps (the seed genome)",
    "precision": "precision-only search (quad steps fixed)",
    "timesteps": "timestep-only search (uniform {w} fixed)",
    "random": "random search, same evaluations",
    "joint": "**joint search**",
}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.2f} ± {sd:.2f} ({len(values)} seeds)"


SEEDS = (0, 1, 2)  # the table's seeds for every searched method


def search_table(d: dict) -> str:
    out = []
    for budget in ("w6a6", "w4a8"):
        rows = [r for r in d["rows"] if r["budget"] == budget]
        if not rows:
            continue
        w = {"w6a6": "W6A6", "w4a8": "W4A8"}[budget]
        cands = "{8,7,6,5}" if budget == "w6a6" else "{8,7,6,5,4}"
        out.append(
            f"Budget: total BitOPs of uniform {w} at 10 steps "
            f"({rows[0]['budget_bitops'] / 1e9:.1f} GBitOPs per image), bits {cands}."
        )
        out += [
            "",
            "| method | FID 10k fresh samples | FID 2k (search's noise) "
            "| GBitOPs / image | evaluations |",
            "| --- | --- | --- | --- | --- |",
        ]
        missing = []
        for method in ("fp", "uniform", "precision", "timesteps", "random", "joint"):
            rs = [r for r in rows if r["method"] == method]
            if method not in ("fp", "uniform"):
                have = {r["seed"] for r in rs}
                if lack := [s for s in SEEDS if s not in have]:
                    missing.append(f"{method} (seed {', '.join(map(str, lack))})")
            if not rs:
                continue
            out.append(
                f"| {_LABELS[method].format(w=w)} | {_mean_std([r['fid_10k'] for r in rs])} "
                f"| {_mean_std([r['fid_2k'] for r in rs])} "
                f"| {_mean_std([r['bitops'] / 1e9 for r in rs])} "
                f"| {rs[0]['evaluations']} |"
            )
        if missing:
            out += ["", f"Not yet run at {w}: {'; '.join(missing)}."]
        out.append("")
    return "\n".join(out) + "\n" + _search_sources(d)


def _search_sources(d: dict) -> str:
    """The table's footer: which device ran which rows, the dates, the commands
    (rows carry their own; a table from before they did names its parts')."""
    rows = d["rows"]
    if not all("command" in r for r in rows):
        parts = "; ".join(f"`{p['command']}`" for p in d.get("parts", [d]))
        return f"*{d['device']}, {d['date'][:10]}; {parts} → `benchmarks/results/search_table.json`*"
    by_device: dict[str, dict] = {}
    for r in rows:
        key = (r["budget"].upper(), r["method"])
        by_device.setdefault(r["device"], {}).setdefault(key, []).append(r["seed"])
    # the device that ran most rows is "the rest"; the others list their rows
    order = sorted(by_device, key=lambda dev: -sum(map(len, by_device[dev].values())))
    devices = order[0] if len(order) == 1 else f"{order[0]}: every row but these"
    for dev in order[1:]:
        runs = sorted(by_device[dev].items())
        devices += f"; {dev}: " + ", ".join(
            f"{b} {m} (seed {', '.join(map(str, sorted(seeds)))})"
            for (b, m), seeds in runs
        )
    dates = sorted({r["date"][:10] for r in rows})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (
        f"*{devices}; {when}; each row one `python -m benchmarks.search_table --budget B "
        "--methods M --seeds S` (the JSON gives each row's device, command and date, "
        "or where its `provenance_note` says so, its part file's date) → "
        "`benchmarks/results/search_table.json`*"
    )


def large_table(base: dict, large: dict, m_base: dict, m_large: dict) -> str:
    def fps(m):
        return m["sampling"]["by_dtype"]["float32"]["images_per_s"]

    lines = [
        "| DDIM / DDPM setting | shipped (2.7M) | `configs/fmnist_large.py` (4.0M, 80k steps) |",
        "| --- | --- | --- |",
    ]
    for a, b in zip(base["rows"], large["rows"], strict=True):
        lines.append(
            f"| {a['sampler'].upper()} {a['steps']} {a['schedule']} "
            f"| {a['fid']:.3f} | {b['fid']:.3f} |"
        )
    lines.append(
        f"| fp32 DDIM 100 images/s, batch 1000 | {fps(m_base):,.0f} | {fps(m_large):,.0f} |"
    )
    src = (
        f"*{large['device']}, {large['date'][:10]}, `{large['command']}` → "
        "`benchmarks/results/fp_baseline_large.json`, `fp_model_large.json`*"
    )
    return "\n".join(lines) + "\n\n" + src


_CALIBRATIONS = {
    "minmse": "min-MSE",
    "minmse_bc": "min-MSE + bias corr.",
    "recon": "reconstruction",
    "recon_bc": "reconstruction + bias corr.",
    "dynamic": "none (dynamic absmax)",
}


def _quant_row(r: dict, fp: dict | None) -> str:
    label = "full precision" if r["calibration"] is None else r["config"]
    calib = "—" if r["calibration"] is None else _CALIBRATIONS[r["calibration"]]
    diff = r.get("vs_fp_same_noise", {}).get("rms_diff_gray")
    diff = "—" if diff is None else f"{diff:.1f}"
    if r["fid"] is None:
        fid = f"not finite ({100 * r['finite_fraction']:.0f}% finite samples)"
        ratio = kid = ""
    else:
        fid = f"{r['fid']:.3f}"
        ratio = f"{r['fid'] / fp['fid']:.2f}" if fp and fp["fid"] else ""
        kid = f"{r['kid']:.4f} ± {r['kid_std']:.4f}"
    return (
        f"| {label} | {calib} | {fid} | {ratio} | {kid} | {diff} "
        f"| {r['bitops'] / 1e9:,.1f} | {r['size_bits'] / 8e6:.2f} |"
    )


def _secs(v: float | None) -> str:
    return "time not recorded" if v is None else f"{v:.0f} s"


def quant_uniform_table(d: dict) -> str:
    rows = d["rows"]
    out = [
        f"{d['num_samples']} samples per row, seed {d['seed']}, the same noises "
        "in every row; x FP: FID over the full-precision FID at the same steps; "
        "RMS diff: to the full-precision image from the same noise, in gray "
        "levels (2/255).",
        "",
    ]
    settings = sorted(
        {(r["steps"], r["schedule"]) for r in rows}, key=lambda s: (-s[0], s[1])
    )
    for steps, schedule in settings:
        rs = [r for r in rows if (r["steps"], r["schedule"]) == (steps, schedule)]
        fp = next((r for r in rs if r["calibration"] is None), None)
        order = list(_CALIBRATIONS)
        rs.sort(
            key=lambda r: (
                r["calibration"] is not None,
                -r["w_bits"],
                -r["a_bits"],
                order.index(r["calibration"]) if r["calibration"] else 0,
            )
        )
        out += [
            f"DDIM, {steps} {schedule} steps:",
            "",
            "| precision | calibration | FID (FMNIST clf.) | x FP | KID "
            "| RMS diff to FP images | GBitOPs / image | weights (MB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *(_quant_row(r, fp) for r in rs),
            "",
        ]
    cal = d.get("calibrations", {})
    c = ",".join(map(str, d["candidates"]))
    notes = []
    for kind, record in cal.items():
        settings = record.get("settings")
        if not settings:  # dynamic: nothing was made
            continue
        what = f"{_CALIBRATIONS[kind]} of widths {{{c}}}"
        if r := settings.get("reconstruct"):
            what += (
                f" ({r['steps']} Adam steps for each of {r['fits']} block x width "
                f"fits, {r['fits_improved']} kept)"
            )
        notes.append(f"{what}: {_secs(record.get('seconds'))}")
    if notes:
        out += ["; ".join(notes) + ".", ""]
    parts = "; ".join(f"`{p['command']}`" for p in d.get("parts", [d]))
    out.append(
        f"*{d['device']}, {d['date'][:10]}; {parts} → "
        "`benchmarks/results/quant_uniform.json`*"
    )
    return "\n".join(out)


_SEARCH_CALIBRATIONS = {  # file tag -> label, as in _CALIBRATIONS
    "minmse": "min-MSE (shipped)",
    "minmse_bc": "min-MSE + bias corr.",
    "recon_bc": "reconstruction + bias corr.",
}


def search_calibration_table() -> str | None:
    """The W6A6 joint search under each calibration: paper_search_w6a6.json (the
    shipped calibration, seed 0) and search_calibration/*.json."""
    runs: dict[str, dict[int, tuple[dict, dict]]] = {}
    files = sorted((RESULTS / "search_calibration").glob("joint_w6a6_seed*_*.json"))
    if not files:
        return None
    for f in [RESULTS / "paper_search_w6a6.json", *files]:
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        tag = (
            "minmse" if f.name == "paper_search_w6a6.json" else f.stem.split("_", 3)[3]
        )
        for r in d["rows"]:
            if r["method"] == "joint" and r["budget"] == "w6a6":
                runs.setdefault(tag, {})[r["seed"]] = (r, d)
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    out = [
        "The W6A6 joint search (paper protocol) under each calibration of widths "
        "{8,7,6,5}: FID of the best genome re-scored on 10k samples (2k in "
        "brackets).",
        "",
        "| calibration | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "| --- |" + " --- |" * len(seeds),
    ]
    for tag, label in _SEARCH_CALIBRATIONS.items():
        cells = []
        for s in seeds:
            r = runs.get(tag, {}).get(s)
            cells.append(
                "—" if r is None else f"{r[0]['fid_10k']:.2f} ({r[0]['fid_2k']:.2f})"
            )
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    dates = sorted({d["date"][:10] for by in runs.values() for _, d in by.values()})
    devices = sorted({d["device"] for by in runs.values() for _, d in by.values()})
    out.append(
        f"\n*{', '.join(devices)}, {', '.join(dates)}; `python -m "
        "benchmarks.search_table --methods joint --budget w6a6 --seeds S "
        "[--override calibration=DIR]` → `benchmarks/results/paper_search_w6a6.json`, "
        "`benchmarks/results/search_calibration/` (each file names its "
        "calibration)*"
    )
    return "\n".join(out)


def render_quant_uniform() -> str:
    if d := _load("quant_uniform.json"):
        text = quant_uniform_table(d)
        if extra := search_calibration_table():
            text += "\n\n" + extra
        return text
    return (
        "Not yet measured: `python -m benchmarks.quant_uniform` writes "
        "`benchmarks/results/quant_uniform.json`."
    )


def render() -> str:
    parts = []
    if d := _load("fp_model.json"):
        parts += ["### The shipped model", fp_model_table(d)]
    if d := _load("fp_baseline.json"):
        parts += ["### Full-precision sample quality", fp_baseline_table(d)]
    large = [_load(n) for n in ("fp_baseline.json", "fp_baseline_large.json")]
    speed = [_load(n) for n in ("fp_model.json", "fp_model_large.json")]
    if all(large) and all(speed):
        parts += [
            "### The larger candidate model (not shipped)",
            large_table(*large, *speed),
        ]
    if d := _load("search_table.json"):
        parts += [
            "### The search (10 steps, 2000 samples per candidate)",
            search_table(d),
        ]
    return "\n\n".join(parts)


_SUMMARY = {
    "fp": "full precision, quad steps",
    "uniform": "uniform bits (the budget's), quad steps",
    "precision": "precision-only search (quad steps)",
    "timesteps": "timestep-only search (uniform bits)",
    "random": "random search, same evaluations",
    "joint": "**joint search** (timesteps + bits)",
}


def summary_table(d: dict) -> str:
    """The README's table: each method's FID on 10k fresh samples at both budgets."""
    gbitops = {r["budget"]: r["budget_bitops"] / 1e9 for r in d["rows"]}
    budgets = sorted(gbitops, reverse=True)  # w6a6, w4a8
    rows = lambda b, m: [r for r in d["rows"] if r["budget"] == b and r["method"] == m]
    head = [f"FID, {b.upper()} budget ({gbitops[b]:.1f} GBitOPs)" for b in budgets]
    out = ["| 10 DDIM steps | " + " | ".join(head) + " |"]
    out.append("| --- |" + " --- |" * len(head))
    for m, label in _SUMMARY.items():
        fids = [[r["fid_10k"] for r in rows(b, m)] for b in budgets]
        cells = [_mean_std(f) if f else "—" for f in fids]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + (
        "\n\n*FID (FMNIST classifier features) of each method's best genome on 10k "
        "fresh samples (mean ± standard deviation over seeds); every search spends "
        "the same 810 evaluations; `benchmarks/results/search_table.json`, rendered "
        "with its devices and commands in [docs/results.md](docs/results.md)*"
    )


def render_summary() -> str:
    d = _load("search_table.json")
    return summary_table(d) if d else "Not yet measured: `benchmarks.search_table`."


def blocks() -> list[tuple[Path, str, str, object]]:
    """Every rendered block: (file, begin marker, end marker, renderer)."""
    return [
        (README, SUMMARY_BEGIN, SUMMARY_END, render_summary),
        (RESULTS_DOC, BEGIN, END, render),
        (RESULTS_DOC, QUANT_BEGIN, QUANT_END, render_quant_uniform),
        (PERF_DOC, PERF_BEGIN, PERF_END, render_perf),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    docs = "rewrite the blocks in README.md and docs/ (--readme: the old name)"
    ap.add_argument("--docs", "--readme", action="store_true", help=docs)
    if not ap.parse_args().docs:
        print("\n\n".join(render() for *_, render in blocks()))
        return
    for path in dict.fromkeys(p for p, *_ in blocks()):
        text = path.read_text()
        for _, begin, end, fn in (b for b in blocks() if b[0] == path):
            if begin not in text or end not in text:
                raise SystemExit(f"{path}: the markers {begin} {end} are missing")
            block = f"{begin}\n{fn()}\n{end}"
            pattern = re.escape(begin) + ".*?" + re.escape(end)
            text = re.sub(pattern, lambda _, b=block: b, text, flags=re.S)
        path.write_text(text)


if __name__ == "__main__":
    main()
