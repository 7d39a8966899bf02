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


def render() -> str:
    parts = []
    if d := _load("fp_model.json"):
        parts += ["### The shipped model", fp_model_table(d)]
    if d := _load("fp_baseline.json"):
        parts += ["### Full-precision sample quality", fp_baseline_table(d)]
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
