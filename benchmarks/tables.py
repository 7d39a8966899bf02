"""Renders the README's tables from the JSON in benchmarks/results/ (no figure typed by hand).

python -m benchmarks.tables            # prints markdown
python -m benchmarks.tables --readme   # rewrites the block between the markers in README.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import RESULTS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


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
            "| GBitOPs / image | evaluations | wall s (H100) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method in ("fp", "uniform", "precision", "timesteps", "random", "joint"):
            rs = [r for r in rows if r["method"] == method]
            if not rs:
                continue
            out.append(
                f"| {_LABELS[method].format(w=w)} | {_mean_std([r['fid_10k'] for r in rs])} "
                f"| {_mean_std([r['fid_2k'] for r in rs])} "
                f"| {_mean_std([r['bitops'] / 1e9 for r in rs])} "
                f"| {rs[0]['evaluations']} | {_mean_std([r['wall_s'] for r in rs])} |"
            )
        out.append("")
    parts = "; ".join(f"`{p['command']}`" for p in d.get("parts", [d]))
    src = f"*{d['device']}, {d['date'][:10]}; {parts} → `benchmarks/results/search_table.json`*"
    return "\n".join(out) + "\n" + src


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    text = render()
    if not args.readme:
        print(text)
        return
    readme = README.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in readme:
        readme = re.sub(
            re.escape(BEGIN) + ".*?" + re.escape(END),
            lambda _: block,
            readme,
            flags=re.S,
        )
    else:
        readme = readme.rstrip() + "\n\n" + block + "\n"
    README.write_text(readme)


if __name__ == "__main__":
    main()
