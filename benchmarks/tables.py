"""Renders the measured tables of the README and docs/ from the JSON in
benchmarks/results/ (no figure typed by hand).

python -m benchmarks.tables          # prints every block as markdown
python -m benchmarks.tables --docs   # rewrites the blocks between their markers
"""

import argparse
import json
import re

from benchmarks.common import REPO as ROOT
from benchmarks.common import RESULTS, md_table
from benchmarks.common import load_result as _load
from benchmarks.tables_perf import render_perf
from benchmarks.tables_search import _src, render_eval_cpu, search_table

README = ROOT / "README.md"


def fp_model_table(d: dict) -> str:
    s = d["sampling"]["by_dtype"]
    head = "parameters | training | GPU wall time | DDIM 100 steps, batch 1000: fp32 | bf16"
    row = [f"{d['param_count']:,}"]
    row.append(f"{d['training_steps']:,} steps x {d['training_batch_size']}")
    row.append(f"{d['training_gpu_wall_s'] / 60:.1f} min ({d['training_device']})")
    row += [f"{s[t]['images_per_s']:,.0f} img/s" for t in ("float32", "bfloat16")]
    return md_table(head, [row]) + "\n\n" + _src(d, "fp_model.json")


def fp_baseline_table(d: dict) -> str:
    floor = {f["num_samples"]: f for f in d["floor"]}
    n, rows = d["rows"][0]["num_samples"], []
    for r in d["rows"]:
        ratio = r["fid"] / floor[n]["mean"] if n in floor else float("nan")
        rows.append([r["sampler"].upper(), r["steps"], r["schedule"]])
        rows[-1] += [f"{r['fid']:.3f}", f"{ratio:.1f}", f"{r['kid']:.4f}"]
        rows[-1] += [f"{r['is']:.2f}", f"{100 * r['min_class_fraction']:.1f}%"]
    for size, f in sorted(floor.items()):
        mean = f"{f['mean']:.3f} ± {f['std']:.3f}"
        rows.append(["real train images (floor)", "", f"{size} samples", mean, "1.0"])
        rows[-1] += ["", "", ""]
    head = "sampler | steps | schedule | FID (FMNIST clf.) | x floor | KID | IS | min class"
    intro = f"{n} samples per row, seed 0, against the 10k test-set statistics.\n\n"
    return intro + md_table(head, rows) + "\n\n" + _src(d, "fp_baseline.json")


def large_table(base: dict, large: dict, m_base: dict, m_large: dict) -> str:
    fps = lambda m: f"{m['sampling']['by_dtype']['float32']['images_per_s']:,.0f}"
    rows = [
        [f"{a['sampler'].upper()} {a['steps']} {a['schedule']}", f"{a['fid']:.3f}"]
        + [f"{b['fid']:.3f}"]
        for a, b in zip(base["rows"], large["rows"], strict=True)
    ]
    rows.append(["fp32 DDIM 100 images/s, batch 1000", fps(m_base), fps(m_large)])
    head = "DDIM / DDPM setting | shipped (2.7M) | `configs/fmnist_large.py` (4.0M, 80k steps)"
    src = _src(large, "fp_baseline_large.json`, `fp_model_large.json")
    return md_table(head, rows) + "\n\n" + src


_CALIBRATIONS = {"minmse": "min-MSE", "minmse_bc": "min-MSE + bias corr.",
                 "recon": "reconstruction", "recon_bc": "reconstruction + bias corr.",
                 "dynamic": "none (dynamic absmax)", "gptq": "GPTQ",
                 "gptq_seq": "GPTQ, sequential", "gptaq": "GPTAQ",
                 "gptaq_clip": "GPTAQ + clip search"}  # fmt: skip


def _quant_row(r: dict, fp: dict | None) -> list:
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
    size = f"{r['size_bits'] / 8e6:.2f}"
    return [label, calib, fid, ratio, kid, diff, f"{r['bitops'] / 1e9:,.1f}", size]


def quant_uniform_table(d: dict) -> str:
    rows = d["rows"]
    out = [f"{d['num_samples']} samples per row, seed {d['seed']}, the same noises in "
           "every row; x FP: FID over the full-precision FID at the same steps; RMS "
           "diff: to the full-precision image from the same noise, in gray levels "
           "(2/255).", ""]  # fmt: skip
    order = [None, *_CALIBRATIONS]  # FP first, then by widths, then calibration
    rank = lambda r: (r["calibration"] is not None, -r["w_bits"], -r["a_bits"])
    head = "precision | calibration | FID (FMNIST clf.) | x FP | KID | RMS diff to FP images | GBitOPs / image | weights (MB)"
    settings = {(r["steps"], r["schedule"]) for r in rows}
    for steps, schedule in sorted(settings, key=lambda s: (-s[0], s[1])):
        rs = [r for r in rows if (r["steps"], r["schedule"]) == (steps, schedule)]
        fp = next((r for r in rs if r["calibration"] is None), None)
        rs.sort(key=lambda r: (*rank(r), order.index(r["calibration"])))
        table = md_table(head, [_quant_row(r, fp) for r in rs])
        out += [f"DDIM, {steps} {schedule} steps:", "", table, ""]
    notes = []
    for kind, record in d.get("calibrations", {}).items():
        if not (settings := record.get("settings")):  # dynamic: nothing was made
            continue
        c = ",".join(map(str, record.get("candidates", d["candidates"])))
        what = f"{_CALIBRATIONS[kind]} of widths {{{c}}}"
        if r := settings.get("reconstruct"):
            what += f" ({r['steps']} Adam steps for each of {r['fits']} block x width fits, {r['fits_improved']} kept)"
        secs = record.get("seconds")
        secs = "time not recorded" if secs is None else f"{secs:.0f} s"
        notes.append(f"{what}: {secs}")
    if notes:
        out += ["; ".join(notes) + ".", ""]
    return "\n".join(out + [_src(d, "quant_uniform.json", ";")])


_SEARCH_CALIBRATIONS = {  # file tag -> label, as in _CALIBRATIONS
    "minmse": "min-MSE (shipped)", "minmse_bc": "min-MSE + bias corr.",
    "recon_bc": "reconstruction + bias corr."}  # fmt: skip


def search_calibration_table() -> str | None:
    """The W6A6 joint search under each calibration: paper_search_w6a6.json (the
    shipped calibration, seed 0) and search_calibration/*.json."""
    runs: dict[str, dict[int, tuple[dict, dict]]] = {}
    files = sorted((RESULTS / "search_calibration").glob("joint_w6a6_seed*_*.json"))
    if not files:
        return None
    files = [RESULTS / "paper_search_w6a6.json", *files]
    for f in files:
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        tag = "minmse" if f == files[0] else f.stem.split("_", 3)[3]
        for r in d["rows"]:
            if r["method"] == "joint" and r["budget"] == "w6a6":
                runs.setdefault(tag, {})[r["seed"]] = (r, d)
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    cell = lambda r: f"{r['fid_10k']:.2f} ({r['fid_2k']:.2f})" if r else "—"
    rows = [
        [label, *(cell(runs.get(tag, {}).get(s, (None,))[0]) for s in seeds)]
        for tag, label in _SEARCH_CALIBRATIONS.items()
    ]
    runs_ = [d for by in runs.values() for _, d in by.values()]
    dates = ", ".join(sorted({d["date"][:10] for d in runs_}))
    devices = ", ".join(sorted({d["device"] for d in runs_}))
    table = md_table(["calibration", *(f"seed {s}" for s in seeds)], rows)
    return ("The W6A6 joint search (paper protocol) under each calibration of widths "
            "{8,7,6,5}: FID of the best genome re-scored on 10k samples (2k in "
            f"brackets).\n\n{table}\n\n*{devices}, {dates}; `python -m "
            "benchmarks.search_table --methods joint --budget w6a6 --seeds S "
            "[--override calibration=DIR]` → "
            "`benchmarks/results/paper_search_w6a6.json`, "
            "`benchmarks/results/search_calibration/` (each file names its "
            "calibration)*")  # fmt: skip


def render_quant_uniform() -> str:
    if d := _load("quant_uniform.json"):
        extra = search_calibration_table()
        return quant_uniform_table(d) + (f"\n\n{extra}" if extra else "")
    return "Not yet measured: `python -m benchmarks.quant_uniform` writes `benchmarks/results/quant_uniform.json`."


def render() -> str:
    parts = []
    if d := _load("fp_model.json"):
        parts += ["### The shipped model", fp_model_table(d)]
    if d := _load("fp_baseline.json"):
        parts += ["### Full-precision sample quality", fp_baseline_table(d)]
    names = ("fp_baseline", "fp_baseline_large", "fp_model", "fp_model_large")
    if all(large := [_load(f"{n}.json") for n in names]):
        parts += ["### The larger candidate model (not shipped)", large_table(*large)]
    if d := _load("search_table.json"):
        parts.append("### The search (10 steps, 2000 samples per candidate)")
        parts.append(search_table(d))
    return "\n\n".join(parts)


def render_dit() -> str:
    """The DiT's full-precision FID against steps and guidance (two spaces)."""
    if not (d := _load("dit_fp.json")):
        return "Not yet measured: `python -m benchmarks.dit_fp`."
    scales = sorted({r["guidance"] for r in d["rows"]})
    out = []
    for key, space in (("fid", "classifier features"), ("fid_pixels", "pooled pixels")):
        rows = [
            [f"{n} {d['rows'][0]['solver'].capitalize()} steps"]
            + [f"{r[key]:.2f}" for g in scales for r in d["rows"]
               if r["steps"] == n and r["guidance"] == g]
            for n in sorted({r["steps"] for r in d["rows"]})
        ]  # fmt: skip
        head = [f"FID ({space})", *(f"guidance {g:g}" for g in scales)]
        out.append(md_table(head, rows))
    t = d["training"]
    if t.get("train_wall_s_total") is None:  # a run on a model dir before its card
        card = json.loads((ROOT / "checkpoints/fmnist_dit/card.json").read_text())
        t = {k: card.get(k) for k in ("steps", "device", "train_wall_s_total")}
    trained = (f"{t['steps']:,} training steps ({t['train_wall_s_total']:.0f} s on "
               f"{t['device']}, `checkpoints/fmnist_dit/card.json`)")  # fmt: skip
    note = (
        f"*{d['params']:,} parameters, {d['gflop_per_image']:.2f} GFLOP per forward "
        f"(guidance > 1 runs two), {trained}; "
        f"{d['num_samples']} class-balanced samples per cell against the test split; "
    )
    return "\n\n".join(out) + "\n\n" + note + _src(d, "dit_fp.json", "")[1:]


def render_search_front() -> str:
    """Issue 22: N searched under total-BitOPs budgets and one front; the table and
    docs/search_front.png, both from search_front.json."""
    if not (d := _load("search_front.json")):
        return "Not yet measured: `python -m benchmarks.search_front` writes `benchmarks/results/search_front.json`."
    from benchmarks.search_front import figure, table

    figure(d, ROOT / "docs" / "search_front.png")
    return table(d) + "\n\n![FID against total BitOPs, every method](search_front.png)"


def blocks() -> list[tuple]:
    """Every rendered block: (file, begin marker, end marker, renderer)."""
    results, perf = ROOT / "docs" / "results.md", ROOT / "docs" / "performance.md"
    spec = [(README, "eval_cpu", render_eval_cpu),
            (results, "tables", render),
            (results, "quant_uniform", render_quant_uniform),
            (results, "dit", render_dit),
            (results, "search_front", render_search_front),
            (perf, "perf_big", lambda: render_perf(big=True)),
            (perf, "perf", render_perf)]  # fmt: skip
    return [(p, f"<!-- {t}:begin -->", f"<!-- {t}:end -->", fn) for p, t, fn in spec]


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
