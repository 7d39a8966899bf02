"""Renders the README's tables from the JSON in benchmarks/results/ (no figure typed by hand).

python -m benchmarks.tables            # prints markdown
python -m benchmarks.tables --readme   # rewrites the blocks between the markers in README.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import RESULTS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
QUANT_BEGIN, QUANT_END = "<!-- quant_uniform:begin -->", "<!-- quant_uniform:end -->"
PERF_BEGIN, PERF_END = "<!-- perf:begin -->", "<!-- perf:end -->"


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


def _target(ok: bool) -> str:
    return "met" if ok else "**not met**"


def perf_table(d: dict) -> str:
    """The issue's four targets, then layouts, paths, sample chunks and sampling."""
    parts = [
        _perf_targets(d),
        _perf_layouts(d),
        _perf_paths(d),
        _perf_sample_chunks(d),
        _perf_sampling(d),
    ]
    chain = d.get("resumed_from") or []
    chain = chain if isinstance(chain, list) else [chain]
    src = [f"`{c}`" for c in [*chain, d["command"]]]
    if d.get("paper_search"):
        src.append(f"`{d['paper_search']['command']}`")
    parts.append(
        f"*{d['device']}, jax {d['jax_version']}, {d['date'][:10]}; "
        f"{'; '.join(src)}; `{d.get('vs_torch_eager_source', '')}` → "
        "`benchmarks/results/perf.json`*"
    )
    return "\n\n".join(p for p in parts if p)


def _perf_targets(d: dict) -> str:
    wall, q, torch = (
        d.get("paper_search_wall_s"),
        d.get("quant_vs_fp_throughput"),
        d.get("vs_torch_eager"),
    )
    frac, static = (
        d.get("flops_fraction_of_bf16_ceiling"),
        d.get("vs_static_aqt_recompile"),
    )
    out = [
        "| target (one H100) | measured | |",
        "| --- | --- | --- |",
    ]
    if wall is not None:
        out.append(
            f"| paper-protocol search <= 10 min | {wall / 60:.1f} min | {_target(wall <= 600)} |"
        )
    if q is not None:
        out.append(
            f"| quantized population evaluation >= 70% of full-precision throughput "
            f"| {100 * q:.0f}% | {_target(q >= 0.7)} |"
        )
    if torch is not None:
        out.append(
            f"| >= 5x the PyTorch-eager way per candidate | {torch:.2f}x | "
            f"{_target(torch >= 5)} |"
        )
    if frac is not None:
        out.append(
            f"| >= 30% of the measured bf16 matmul ceiling "
            f"({d['bf16_ceiling_flops_per_s'] / 1e12:.0f} TFLOP/s) "
            f"| {100 * frac:.1f}% ({d['achieved_flops_per_s'] / 1e12:.0f} TFLOP/s) "
            f"| {_target(frac >= 0.3)} |"
        )
    if static is not None:
        out.append(
            f"| (no target) vs bits as constants, recompiled per genome | "
            f"{static:.0f}x ({d['static_aqt_recompile']['seconds_per_genome']:.1f} s "
            "a genome) | |"
        )
    return "\n".join(out)


def _perf_layouts(d: dict) -> str:
    rows = d.get("layouts") or []
    if not rows:
        return ""
    out = [
        "| P | chunk | layout | sample-steps/s | peak memory (GiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    mem = {m["chunk"]: m.get("peak_bytes") for m in d.get("memory") or []}
    for r in rows:
        rate = r.get("sample_steps_per_s")
        peak = mem.get(r["chunk"])
        out.append(
            f"| {r['P']} | {r['chunk']} | {r['layout']} | "
            f"{f'{rate:,.0f}' if rate else r.get('skipped', '—')} | "
            f"{f'{peak / 2**30:.1f}' if peak else '—'} |"
        )
    return "\n".join(out)


def _perf_paths(d: dict) -> str:
    paths = d.get("paths_sample_steps_per_s") or {}
    if not paths:
        return ""
    names = {
        "quantize_every_step_f32": "weights quantized at every step (f32 convs)",
        "frozen_f32": "weights frozen once per genome (f32 convs) — the default",
        "frozen_bf16": "weights frozen once per genome, bf16 integer convs",
    }
    out = [
        "| one candidate at a time, P = 8 | sample-steps/s |",
        "| --- | --- |",
        f"| plain full-precision forward, same images | "
        f"{d['fp_sample_steps_per_s']:,.0f} |",
    ]
    out += [f"| {names.get(k, k)} | {v:,.0f} |" for k, v in paths.items()]
    return "\n".join(out)


def _perf_sample_chunks(d: dict) -> str:
    rows = d.get("sample_chunks") or []
    if not isinstance(rows, list) or not rows:
        return ""
    out = [
        "| images drawn together per candidate (`sample_chunk`) | quantized "
        "sample-steps/s | full precision | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        q, f = r["quant_sample_steps_per_s"], r["fp_sample_steps_per_s"]
        c = r["sample_chunk"] or "all (0)"
        out.append(f"| {c} | {q:,.0f} | {f:,.0f} | {q / f:.2f} |")
    return "\n".join(out)


def _perf_sampling(d: dict) -> str:
    sampling = d.get("sampling") or []
    if not isinstance(sampling, list) or not sampling:
        return ""
    names = {
        "fp32_ddim100": "full precision, DDIM 100 steps",
        "fp32_ddim10_quad": "full precision, DDIM 10 quad steps",
        "searched_fake_quant": "searched genome, fake-quant",
        "searched_int8_serve_f32": "searched genome, served int8 (f32 convs)",
        "searched_int8_serve_bf16": "searched genome, served int8 (bf16 convs)",
        "searched_int8_serve_f32_closed_over": "searched genome, served int8, "
        "weights closed over as constants",
    }
    out = [
        f"| sampling (batch {sampling[0]['batch']}) | steps | images/s "
        "| latency, one image |",
        "| --- | --- | --- | --- |",
    ]
    for r in sampling:
        lat = r.get("latency_s")
        out.append(
            f"| {names.get(r['mode'], r['mode'])} | {r['steps']} | "
            f"{r['images_per_s']:,.0f} | "
            f"{'—' if lat is None else f'{1e3 * lat:.1f} ms'} |"
        )
    return "\n".join(out)


KERNEL_PROGRAMS = {
    "quant_f32": "search fitness (the default)",
    "quant_f32_concat": "search fitness, GroupNorm of the skip concatenation (before)",
    "quant_int8": "search fitness, int8 integer convs asked for explicitly",
    "quant_bf16": "search fitness, bf16 integer convs",
    "quant_bf16_model": "search fitness, bf16 convs and bf16 activations",
    "fp": "plain full-precision sampling",
    "fp_concat": "plain full-precision sampling, GroupNorm of the concatenation (before)",
}


def bandwidth_bound(d: dict, ceiling: float | None) -> str | None:
    """The default program's nominal bytes at the best bandwidth one elementwise
    pass reached in the same run: the time no faster kernel of XLA's fusion can beat,
    and the FLOP fraction that caps."""
    progs = d["programs"]
    q = progs.get("quant_f32", {})
    floors = [
        r["floor_bytes_per_s"]
        for k, r in progs.items()
        if k.endswith("_floor") and "floor_bytes_per_s" in r  # not a failed run
    ]
    if "bytes_by_kind" not in q or not floors or not ceiling:
        return None
    total = sum(q["bytes_by_kind"].values())
    t = total / max(floors)
    frac = q["flops"] / t / ceiling
    return (
        f"The default's kernels move {total / 1e9:.0f} GB a candidate (nominal); at "
        f"the {max(floors) / 1e12:.2f} TB/s one elementwise pass reached here, that "
        f"alone takes {1e3 * t:.0f} ms (measured: {1e3 * q['wall_s']:.0f} ms), so under "
        f"this accounting these kernels cannot pass about {100 * frac:.0f}% of the "
        f"{ceiling / 1e12:.0f} TFLOP/s bf16 ceiling (perf.json)."
    ) + _matmul_bound(q, ceiling)


def _matmul_bound(q: dict, ceiling: float) -> str:
    """The FLOP fraction if every kernel but the convolutions and gemms took no time:
    what the matmul kernels XLA and cuDNN pick allow at best."""
    us = q.get("us_by_kind", {})
    mm = us.get("convolution", 0.0) + us.get("gemm", 0.0)
    if not mm:
        return ""
    return (
        f" Its convolution and gemm kernels alone take {mm / 1e3:.1f} ms: were every "
        "other kernel free, the program could not pass "
        f"{100 * q['flops'] / (mm * 1e-6) / ceiling:.1f}% of that ceiling."
    )


def _kernel_rows(d: dict) -> list[str]:
    """The table: each program's wall time, FID and kernel time by kind."""
    kinds = ("convolution", "reduction", "concatenate", "elementwise", "gemm")
    steps = f" x {d['steps']} steps" if d.get("steps") else ""
    out = [
        f"| one candidate, {d['samples']} samples{steps} | ms | FID | "
        + " | ".join(kinds)
        + " | other |",
        "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " | --- |",
    ]
    for key, name in KERNEL_PROGRAMS.items():
        r = d["programs"].get(key)
        if not r or "error" in r:
            continue
        frac = r["fraction_by_kind"]
        other = frac["other"] + frac["layout"]
        cells = [f"{100 * frac[k]:.0f}%" if k in frac else "—" for k in kinds]
        fid = f"{r['value']:.4f}" if "value" in r else "—"
        out.append(
            f"| {name} | {1e3 * r['wall_s']:.0f} | {fid} | "
            + " | ".join(cells)
            + f" | {100 * other:.0f}% |"
        )
    return out


def _bandwidth_line(progs: dict) -> str | None:
    q = progs.get("quant_f32", {})
    if not (bw := q.get("bytes_per_s_by_kind")):
        return None
    big = [k for k in bw if q["fraction_by_kind"][k] > 0.05]  # not SVD, copies
    return (
        "Bandwidth of the default's kernels by kind (nominal bytes: each "
        "operand and result once, over kernel time), GB/s: "
        + ", ".join(f"{k} {bw[k] / 1e9:,.0f}" for k in big)
        + "."
    )


def _conv_line(progs: dict) -> str | None:
    rate = lambda key: progs.get(key, {}).get("conv_kernel_flops_per_s")
    convs = []
    for key in progs:
        m = re.fullmatch(r"conv_(\d+)_f32", key)
        if not m or not rate(key):
            continue
        res = m.group(1)
        other = [
            f"{dt} {rate(f'conv_{res}_{dt}') / 1e12:.0f}"
            for dt in ("bf16", "int8")
            if rate(f"conv_{res}_{dt}")
        ]
        convs.append(
            f"{res}x{res}: {rate(key) / 1e12:.0f}"
            + (f" ({', '.join(other)})" if other else "")
        )
    if not convs:
        return None
    return (
        "One 3x3 convolution of the UNet alone (each resolution's channel count "
        "in and out), its kernel's TFLOP/s, f32 (other operand types, f32 out): "
        f"{'; '.join(convs)}."
    )


def _resolutions(progs: dict, prefix: str) -> list[int]:
    """The resolutions of the `<prefix><res>_...` programs, ascending."""
    return sorted({int(k.split("_")[1]) for k in progs if k.startswith(prefix)})


def _norm_line(progs: dict) -> str | None:
    norms = []
    for res in _resolutions(progs, "gn_"):
        row = [
            progs.get(f"gn_{res}_{v}", {}).get("busy_us")
            for v in ("flax", "parts", "floor")
        ]
        if all(row):
            norms.append(f"{res}x{res}: " + " / ".join(f"{v:.0f}" for v in row))
    if not norms:
        return None
    return (
        "GroupNorm + SiLU of one skip concatenation (two parts of the level's "
        "width) alone, kernel µs, flax's on the concatenation / ours on the parts "
        "/ one elementwise pass (the floor of a fused kernel): "
        f"{'; '.join(norms)}."
    )


def fused_norm_quant_text(d: dict) -> str | None:
    """The fused GroupNorm + SiLU + quantizer prototypes against XLA and the floor:
    the default kernel and the best of every kernel and setting tried
    (`kernel_breakdown_gnq.json`)."""
    progs, rows = d["programs"], []
    for res in _resolutions(progs, "gnq_"):
        us = lambda v, res=res: progs.get(f"gnq_{res}_{v}", {}).get("busy_us")
        tried = {
            k.removeprefix(f"gnq_{res}_"): v["busy_us"]
            for k, v in progs.items()
            if k.startswith(f"gnq_{res}_")
            and not k.endswith(("_xla", "_floor"))
            and "busy_us" in v
        }
        if not (us("xla") and us("pallas") and us("floor")):
            continue
        best = min(tried, key=tried.get)
        diff = progs[f"gnq_{res}_{best}"].get("mismatch_fraction")
        rows.append(
            f"{res}x{res}: {us('xla'):.0f} / {us('pallas'):.0f} (best of "
            f"{len(tried)} settings: {tried[best]:.0f}, {best}) / {us('floor'):.0f}"
            + ("" if diff is None else f", {diff:.1e} of the best's values differ")
        )
    if not rows:
        return None
    return (
        "GroupNorm + SiLU + the conv's int8 activation quantizer on the two parts "
        "alone, kernel µs, XLA's two passes / a fused Pallas-Triton kernel, one "
        "program per sample (`benchmarks/fused_norm_quant.py`; settings: pallas_"
        "b<tile elements>_w<warps>_s<stages>, or blocks_g<groups>_b.._w..: one "
        "program per sample and block of groups) / one elementwise pass, float32 "
        f"in, int8 out (the floor): {'; '.join(rows)}.\n\n*{d['device']}, jax "
        f"{d['jax_version']}, {d['date'][:10]}; `{d['command']}` → "
        "`benchmarks/results/kernel_breakdown_gnq.json`*"
    )


def kernel_table(d: dict, ceiling: float | None = None) -> str:
    """GPU kernel time by kind per program, then what the single-op programs and
    the byte counts say."""
    progs = d["programs"]
    lines = [_bandwidth_line(progs), _conv_line(progs), _norm_line(progs)]
    lines.append(bandwidth_bound(d, ceiling))
    out = _kernel_rows(d) + ["\n" + line for line in lines if line]
    out.append(
        f"\n*{d['device']}, jax {d['jax_version']}, {d['date'][:10]}; "
        f"`{d['command']}` → `benchmarks/results/kernel_breakdown.json`*"
    )
    return "\n".join(out)


def render_perf() -> str:
    if d := _load("perf.json"):
        text = perf_table(d)
        if k := _load("kernel_breakdown.json"):
            text += "\n\nWhere the GPU's time goes (`python -m benchmarks.kernel_breakdown`: "
            text += "kernel time by kind, from a profiler trace):\n\n"
            text += kernel_table(k, d.get("bf16_ceiling_flops_per_s"))
        if (g := _load("kernel_breakdown_gnq.json")) and (
            line := fused_norm_quant_text(g)
        ):
            text += "\n\n" + line
        return text
    return "Not yet measured: `python -m benchmarks.perf` writes `benchmarks/results/perf.json`."


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
    blocks = [
        (BEGIN, END, render()),
        (QUANT_BEGIN, QUANT_END, render_quant_uniform()),
        (PERF_BEGIN, PERF_END, render_perf()),
    ]
    if not args.readme:
        print("\n\n".join(text for _, _, text in blocks))
        return
    readme = README.read_text()
    for begin, end, text in blocks:
        block = f"{begin}\n{text}\n{end}"
        if begin in readme:
            readme = re.sub(
                re.escape(begin) + ".*?" + re.escape(end),
                lambda _, b=block: b,
                readme,
                flags=re.S,
            )
        else:
            readme = readme.rstrip() + "\n\n" + block + "\n"
    README.write_text(readme)


if __name__ == "__main__":
    main()
