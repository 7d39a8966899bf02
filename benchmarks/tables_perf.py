"""docs/performance.md's rendered block: the targets, layouts, paths and sampling tables
of perf.json, and where the GPU's time goes (kernel_breakdown*.json)."""

import re

from benchmarks.common import load_result as _load
from benchmarks.common import md_table


def _footer(d: dict, sources: str, name: str) -> str:
    return f"*{d['device']}, jax {d['jax_version']}, {d['date'][:10]}; {sources} → `benchmarks/results/{name}`*"


def perf_table(d: dict) -> str:
    """The issue's four targets, then layouts, paths, sample chunks and sampling."""
    kinds = (_perf_targets, _perf_layouts, _perf_paths, _perf_sample_chunks)
    parts = [f(d) for f in (*kinds, _perf_sampling)]
    chain = d.get("resumed_from") or []
    chain = chain if isinstance(chain, list) else [chain]
    src = [f"`{c}`" for c in [*chain, d["command"]]]
    for k in ("paper_search", "racing_search"):
        if d.get(k):
            src.append(f"`{d[k]['command']}`")
    src.append(f"`{d.get('vs_torch_eager_source', '')}`")
    parts.append(_footer(d, "; ".join(src), "perf.json"))
    return "\n\n".join(p for p in parts if p)


def _perf_targets(d: dict) -> str:
    wall, q = d.get("paper_search_wall_s"), d.get("quant_vs_fp_throughput")
    torch, frac = d.get("vs_torch_eager"), d.get("flops_fraction_of_bf16_ceiling")
    static, rows = d.get("vs_static_aqt_recompile"), []
    met = lambda ok: "met" if ok else "**not met**"
    if wall is not None:
        rows.append(["paper-protocol search <= 10 min", f"{wall / 60:.1f} min"])
        rows[-1].append(met(wall <= 600))
    if race := d.get("racing_search_wall_s"):
        fid, full = d["racing_search_fid_10k"], d.get("full_search_fid_10k") or []
        fitness = d.get("racing_search", {}).get("fitness", "fid")
        what = ("racing search <= 60 s, FID within the full protocol's seed spread "
                f"({fitness} fitness)")  # fmt: skip
        # one process runs the seeds in turn: the first one's time holds the compiles
        got = (f"{', '.join(f'{r:.0f}' for r in race)} s (the first compiles); FID "
               f"{', '.join(f'{f:.2f}' for f in fid)} against "
               f"{', '.join(f'{f:.2f}' for f in full)}")  # fmt: skip
        inside = len(full) > 1 and min(full) <= sum(fid) / len(fid) <= max(full)
        rows.append([what, got, met(max(race) <= 60 and inside)])
    else:  # search_table --methods joint_race, then perf --search-table
        rows.append(["racing search <= 60 s (`joint_race` rows)", "not yet run", ""])
    if q is not None:
        what = "quantized population evaluation >= 70% of full-precision throughput"
        rows.append([what, f"{100 * q:.0f}%", met(q >= 0.7)])
    if torch is not None:
        what = ">= 5x the PyTorch-eager way per candidate"
        rows.append([what, f"{torch:.2f}x", met(torch >= 5)])
    if frac is not None:
        ceiling = f"({d['bf16_ceiling_flops_per_s'] / 1e12:.0f} TFLOP/s)"
        got = f"{100 * frac:.1f}% ({d['achieved_flops_per_s'] / 1e12:.0f} TFLOP/s)"
        what = f">= 30% of the measured bf16 matmul ceiling {ceiling}"
        rows.append([what, got, met(frac >= 0.3)])
    if static is not None:
        secs = d["static_aqt_recompile"]["seconds_per_genome"]
        what = "(no target) vs bits as constants, recompiled per genome"
        rows.append([what, f"{static:.0f}x ({secs:.1f} s a genome)", ""])
    return md_table(["target (one H100)", "measured", ""], rows)


def _perf_layouts(d: dict) -> str:
    mem = {m["chunk"]: m.get("peak_bytes") for m in d.get("memory") or []}
    rows = []
    for r in d.get("layouts") or []:
        rate, peak = r.get("sample_steps_per_s"), mem.get(r["chunk"])
        rows.append([r["P"], r["chunk"], r["layout"]])
        rows[-1].append(f"{rate:,.0f}" if rate else r.get("skipped", "—"))
        rows[-1].append(f"{peak / 2**30:.1f}" if peak else "—")
    head = ["P", "chunk", "layout", "sample-steps/s", "peak memory (GiB)"]
    return md_table(head, rows) if rows else ""


PATHS = {
    "quantize_every_step_f32": "weights quantized at every step (f32 convs)",
    "frozen_f32": "weights frozen once per genome (f32 convs) — the default",
    "frozen_bf16": "weights frozen once per genome, bf16 integer convs",
}


def _perf_paths(d: dict) -> str:
    if not (paths := d.get("paths_sample_steps_per_s") or {}):
        return ""
    fp = f"{d['fp_sample_steps_per_s']:,.0f}"
    rows = [["plain full-precision forward, same images", fp]]
    rows += [[PATHS.get(k, k), f"{v:,.0f}"] for k, v in paths.items()]
    return md_table(["one candidate at a time, P = 8", "sample-steps/s"], rows)


def _perf_sample_chunks(d: dict) -> str:
    if not isinstance(rows := d.get("sample_chunks") or [], list) or not rows:
        return ""
    cells = []
    for r in rows:
        q, f = r["quant_sample_steps_per_s"], r["fp_sample_steps_per_s"]
        cells.append([r["sample_chunk"] or "all (0)", f"{q:,.0f}", f"{f:,.0f}"])
        cells[-1].append(f"{q / f:.2f}")
    head = "images drawn together per candidate (`sample_chunk`) | quantized sample-steps/s | full precision | ratio"
    return md_table(head, cells)


MODES = {"fp32_ddim100": "full precision, DDIM 100 steps",
         "fp32_ddim10_quad": "full precision, DDIM 10 quad steps",
         "searched_fake_quant": "searched genome, fake-quant",
         "searched_int8_serve_f32": "searched genome, served int8 (f32 convs)",
         "searched_int8_serve_bf16": "searched genome, served int8 (bf16 convs)",
         "searched_int8_serve_f32_closed_over":
             "searched genome, served int8, weights closed over as constants",
}  # fmt: skip


def _perf_sampling(d: dict) -> str:
    if not isinstance(rows := d.get("sampling") or [], list) or not rows:
        return ""
    cells = []
    for r in rows:
        lat = "—" if r.get("latency_s") is None else f"{1e3 * r['latency_s']:.1f} ms"
        name = MODES.get(r["mode"], r["mode"])
        cells.append([name, r["steps"], f"{r['images_per_s']:,.0f}", lat])
    head = [f"sampling (batch {rows[0]['batch']})", "steps", "images/s"]
    return md_table(head + ["latency, one image"], cells)


KERNEL_PROGRAMS = {
    "quant_f32": "search fitness (fid, f32 convs: the default layout)",
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
    floors = [r["floor_bytes_per_s"] for k, r in progs.items()  # not failed ones:
              if k.endswith("_floor") and "floor_bytes_per_s" in r]  # fmt: skip
    if "bytes_by_kind" not in q or not floors or not ceiling:
        return None
    total = sum(q["bytes_by_kind"].values())
    t = total / max(floors)
    frac = q["flops"] / t / ceiling
    return (f"The default's kernels move {total / 1e9:.0f} GB a candidate (nominal); "
            f"at the {max(floors) / 1e12:.2f} TB/s one elementwise pass reached here, "
            f"that alone takes {1e3 * t:.0f} ms (measured: {1e3 * q['wall_s']:.0f} "
            "ms), so under this accounting these kernels cannot pass about "
            f"{100 * frac:.0f}% of the {ceiling / 1e12:.0f} TFLOP/s bf16 ceiling "
            "(perf.json)." + _matmul_bound(q, ceiling))  # fmt: skip


def _matmul_bound(q: dict, ceiling: float) -> str:
    """The FLOP fraction if every kernel but the convolutions and gemms took no time:
    what the matmul kernels XLA and cuDNN pick allow at best."""
    us = q.get("us_by_kind", {})
    if not (mm := us.get("convolution", 0.0) + us.get("gemm", 0.0)):
        return ""
    frac = q["flops"] / (mm * 1e-6) / ceiling
    return (f" Its convolution and gemm kernels alone take {mm / 1e3:.1f} ms: were "
            "every other kernel free, the program could not pass "
            f"{100 * frac:.1f}% of that ceiling.")  # fmt: skip


def _kernel_rows(d: dict) -> str:
    """The table: each program's wall time, FID and kernel time by kind."""
    kinds = ["convolution", "reduction", "concatenate", "elementwise", "gemm"]
    steps = f" x {d['steps']} steps" if d.get("steps") else ""
    head = [f"one candidate, {d['samples']} samples{steps}", "ms", "FID", *kinds]
    rows = []
    for key, name in KERNEL_PROGRAMS.items():
        if not (r := d["programs"].get(key)) or "error" in r:
            continue
        frac = r["fraction_by_kind"]
        fid = f"{r['value']:.4f}" if "value" in r else "—"
        rows.append([name, f"{1e3 * r['wall_s']:.0f}", fid])
        rows[-1] += [f"{100 * frac[k]:.0f}%" if k in frac else "—" for k in kinds]
        rows[-1].append(f"{100 * (frac['other'] + frac['layout']):.0f}%")
    return md_table(head + ["other"], rows)


def _bandwidth_line(progs: dict) -> str | None:
    q = progs.get("quant_f32", {})
    if not (bw := q.get("bytes_per_s_by_kind")):
        return None
    big = [k for k in bw if q["fraction_by_kind"][k] > 0.05]  # not SVD, copies
    return ("Bandwidth of the default's kernels by kind (nominal bytes: each operand "
            "and result once, over kernel time), GB/s: "
            + ", ".join(f"{k} {bw[k] / 1e9:,.0f}" for k in big) + ".")  # fmt: skip


def _conv_line(progs: dict) -> str | None:
    rate = lambda key: progs.get(key, {}).get("conv_kernel_flops_per_s")
    convs = []
    for key in progs:
        if not (m := re.fullmatch(r"conv_(\d+)_f32", key)) or not rate(key):
            continue
        res = m.group(1)
        dts = [dt for dt in ("bf16", "int8") if rate(f"conv_{res}_{dt}")]
        other = ", ".join(f"{dt} {rate(f'conv_{res}_{dt}') / 1e12:.0f}" for dt in dts)
        other = f" ({other})" if dts else ""
        convs.append(f"{res}x{res}: {rate(key) / 1e12:.0f}{other}")
    if not convs:
        return None
    return ("One 3x3 convolution of the UNet alone (each resolution's channel count "
            "in and out), its kernel's TFLOP/s, f32 (other operand types, f32 out): "
            f"{'; '.join(convs)}.")  # fmt: skip


def _resolutions(progs: dict, prefix: str) -> list[int]:
    """The resolutions of the `<prefix><res>_...` programs, ascending."""
    return sorted({int(k.split("_")[1]) for k in progs if k.startswith(prefix)})


def _norm_line(progs: dict) -> str | None:
    norms = []
    for res in _resolutions(progs, "gn_"):
        us = lambda v, res=res: progs.get(f"gn_{res}_{v}", {}).get("busy_us")
        row = [us(v) for v in ("flax", "parts", "floor")]
        if all(row):
            norms.append(f"{res}x{res}: " + " / ".join(f"{v:.0f}" for v in row))
    if not norms:
        return None
    return ("GroupNorm + SiLU of one skip concatenation (two parts of the level's "
            "width) alone, kernel µs, flax's on the concatenation / ours on the parts "
            "/ one elementwise pass (the floor of a fused kernel): "
            f"{'; '.join(norms)}.")  # fmt: skip


def fused_norm_quant_text(d: dict) -> str | None:
    """The fused GroupNorm + SiLU + quantizer prototypes against XLA and the floor:
    the default kernel and the best of every kernel and setting tried
    (`kernel_breakdown_gnq.json`)."""
    progs, rows = d["programs"], []
    for res in _resolutions(progs, "gnq_"):
        us = lambda v, res=res: progs.get(f"gnq_{res}_{v}", {}).get("busy_us")
        tried = {k.removeprefix(f"gnq_{res}_"): v["busy_us"] for k, v in progs.items()
                 if k.startswith(f"gnq_{res}_") and not k.endswith(("_xla", "_floor"))
                 and "busy_us" in v}  # fmt: skip
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
    return ("GroupNorm + SiLU + the conv's int8 activation quantizer on the two parts "
            "alone, kernel µs, XLA's two passes / a fused Pallas-Triton kernel, one "
            "program per sample (`benchmarks/experiments/fused_norm_quant.py`; "
            "settings: pallas_b<tile elements>_w<warps>_s<stages>, or "
            "blocks_g<groups>_b.._w..: one program per sample and block of groups) / "
            "one elementwise pass, float32 in, int8 out (the floor): "
            f"{'; '.join(rows)}.\n\n"
            + _footer(d, f"`{d['command']}`", "kernel_breakdown_gnq.json"))  # fmt: skip


def kernel_table(d: dict, ceiling: float | None = None) -> str:
    """GPU kernel time by kind per program, then what single ops and bytes say."""
    progs = d["programs"]
    lines = [_bandwidth_line(progs), _conv_line(progs), _norm_line(progs)]
    lines.append(bandwidth_bound(d, ceiling))
    foot = _footer(d, f"`{d['command']}`", "kernel_breakdown.json")
    return "\n\n".join([_kernel_rows(d), *(line for line in lines if line), foot])


def render_perf(big: bool = False) -> str:
    """perf.json's block, or with `big` perf_big.json's (`render_perf_big`)."""
    if big:
        return render_perf_big()
    if not (d := _load("perf.json")):
        return "Not yet measured: `python -m benchmarks.perf` writes `benchmarks/results/perf.json`."
    text = perf_table(d)
    if k := _load("kernel_breakdown.json"):
        text += "\n\nWhere the GPU's time goes (`python -m benchmarks.experiments.kernel_breakdown`: "
        text += "kernel time by kind, from a profiler trace):\n\n"
        text += kernel_table(k, d.get("bf16_ceiling_flops_per_s"))
    if (g := _load("kernel_breakdown_gnq.json")) and (line := fused_norm_quant_text(g)):
        text += "\n\n" + line
    return text


BIG_TARGETS = {
    "dit_quant_vs_bf16": ("DiT-XL/2 size: quantized population evaluation >= 90% of the bf16 model's throughput", "%"),
    "dit_fraction_of_bf16_ceiling": ("DiT-XL/2 size: population evaluation >= 40% of the bf16 matmul ceiling", "%"),
    "dit_vs_torch_best": ("DiT-XL/2 size: >= 2x the better PyTorch way (torch.compile, eager fake quant)", "x"),
    "unet_quant_vs_bf16": ("SD 1.5 size UNet: quantized population evaluation >= 90% of bf16 throughput", "%"),
    "served_vs_bf16": ("DiT-XL/2 size served quantized >= 1.3x bf16 at the same steps (batch 64)", "x"),
}  # fmt: skip


def render_perf_big() -> str:
    """perf_big.json (issue 26, parts 2 and 4): each target, its value, met or not;
    the serving modes; memory per candidate."""
    if not (d := _load("perf_big.json")):
        return "Not yet measured: `python -m benchmarks.perf_big` (one H100) writes `benchmarks/results/perf_big.json`."
    rows = []
    for key, (what, unit) in BIG_TARGETS.items():
        r = d.get(key) or {}
        if (v := r.get("value")) is None:
            rows.append([what, f"not measured ({r.get('status', 'absent')})", ""])
            continue
        got = f"{100 * v:.0f}%" if unit == "%" else f"{v:.2f}x"
        got += f" ({d['served_best']})" if key == "served_vs_bf16" else ""
        got += (
            f" ({', '.join(d['torch_ways_measured'])})"
            if key == "dit_vs_torch_best"
            else ""
        )
        rows.append([what, got, "met" if r["met"] else "**not met**"])
    parts = [md_table(["target (one H100)", "measured", ""], rows)]
    serve, lat = d.get("serve") or {}, d.get("latency") or {}
    modes = [k for k in ("bf16", "int8_w8a8", "fp8_e4m3") if k in serve]
    if modes:
        cell = lambda k: f"{1e3 * lat[k]['latency_s']:.1f} ms" if k in lat else "—"  # noqa: E731
        head = [
            f"DiT serving, {serve['steps']} steps",
            f"images/s, batch {serve['batch']}",
            "latency, one image",
        ]
        parts.append(
            md_table(
                head, [[k, f"{serve[k]['images_per_s']:,.0f}", cell(k)] for k in modes]
            )
        )
    if "fp8" in d and d["fp8"] != "measured":
        parts.append(f"fp8: {d['fp8']}")
    if (m := d.get("memory") or {}).get("largest_chunk") is not None:
        how = (
            "compiled at chunks 1 and 2"
            if "chunks 1 and 2" in m["how"]
            else "estimated from the chunk-1 program"
        )
        parts.append(f"Memory (the DiT's population program, {m['samples']} samples a candidate, XLA's analysis, {how}): "
                     f"{m['bytes_per_candidate'] / 2**30:.2f} GiB a candidate, {m['fixed_bytes'] / 2**30:.2f} GiB fixed; "
                     f"the largest chunk that fits the device's {m['device_bytes'] / 2**30:.0f} GiB: {m['largest_chunk']}.")  # fmt: skip
    sizes = ", ".join(
        f"{k} {v['params'] / 1e6:.0f}M params"
        for k, v in (d.get("models") or {}).items()
    )
    cmds = [f"`{r['command']}` ({r['date'][:10]}: {', '.join(r['parts'])})"
            for r in d.get("resumed_from", [])]  # fmt: skip
    cmds.append(f"`{d['command']}`")
    parts.append(_footer(d, f"{sizes}; {'; '.join(cmds)}", "perf_big.json"))
    return "\n\n".join(parts)
