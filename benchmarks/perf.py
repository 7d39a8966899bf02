"""The search against the hardware and its own alternatives.

Each comparison's two sides are timed in this one process, on the shipped model and
the paper protocol's shapes (S = 2000 samples a candidate, N = 10 steps): layouts
(P = 8, 16, 40 candidates, samples + FID, in chunks of c vmapped genomes, c = 1 to P;
one compiled program per chunk size, chunks dispatched back to back as
`lax.map(batch_size=c)` runs them) and their peak memory (XLA's memory analysis);
the plain full-precision forward on the same images; weights quantized at every step
(fake-quant) against frozen once per genome (`export.freeze` + SERVE), f32 against
bf16 integer convs; bits as compile-time constants, recompiled per genome, against
the traced genome; achieved FLOP/s against a bf16 matmul ceiling measured here;
sampling (FP 100-step DDIM, the searched genome fake-quant and served int8).

  python -m benchmarks.perf                      # everything, on the GPU
  python -m benchmarks.perf --samples 136 --pops 4 --chunks 1,4 --repeats 1 \
      --static-genomes 1 --ceiling-n 256 --sampling-batch 2 --out /tmp/p.json  # CPU
  python -m benchmarks.perf --resume benchmarks/results/perf.json [--only sampling]

Writes benchmarks/results/perf.json after every section (with torch_eager.json's
PyTorch-eager ratio); `--search-table` adds the paper search's wall time.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import perf_sampling as ps
from benchmarks.common import RESULTS, add_args, ints, provenance, time_fn, write_json
from benchmarks.perf_sampling import _setup  # experiments.kernel_breakdown's import
from tmpq_jax.search.config import SearchConfig, fitness_label

DEFAULT_FITNESS = fitness_label(SearchConfig())  # the racing rows' label


def _run_chunks(fn, assets, genomes, c: int):
    outs = [fn(assets, genomes[i : i + c]) for i in range(0, genomes.shape[0], c)]
    return jnp.concatenate(outs)


def layouts(setup, pops, chunks, fits_bytes, repeats, raw: dict) -> dict:
    """Sample-steps/s per (P, chunk) and peak memory per chunk size, appended to
    raw["layout_measurements"] as they come, so a cut-off run keeps them. Each chunk
    size compiles once (chunks should divide every P)."""
    into = raw.setdefault("layout_measurements", {})
    problem, assets = setup.engine.problem, setup.assets
    work = assets.noise.shape[0] * problem.space.num_steps  # sample-steps a genome
    rows, memory = into.setdefault("rows", []), into.setdefault("memory", [])
    chunk_fn = jax.jit(jax.vmap(problem.fid, in_axes=(None, 0)))  # c genomes' fid
    for c in chunks:
        compiled = chunk_fn.lower(assets, ps._genomes(setup, c)).compile()
        memory.append(dict(chunk=c))
        if m := compiled.memory_analysis():
            temp = m.temp_size_in_bytes
            total = temp + m.argument_size_in_bytes + m.output_size_in_bytes
            memory[-1] |= dict(temp_bytes=int(temp), peak_bytes=int(total))
        print(memory[-1], flush=True)
        for p in [p for p in pops if c <= p and p % c == 0]:
            name = "one_at_a_time" if c == 1 else ("vmap_all" if c == p else "chunked")
            row = dict(P=p, chunk=c, layout=name)
            if memory[-1].get("peak_bytes", 0) > fits_bytes:
                rows.append(dict(row, skipped="does not fit in device memory"))
                continue
            g = ps._genomes(setup, p)
            t = time_fn(_run_chunks, compiled, assets, g, c, repeats=repeats)
            rows.append(dict(row, seconds=t, sample_steps_per_s=p * work / t))
            print(rows[-1], flush=True)
    return into


def fp_rate(setup, repeats) -> float:
    """Sample-steps/s of the plain f32 DDIM, same images and steps, search's chunks."""
    lm, assets, n = setup.lm, setup.assets, setup.space.num_steps
    run = jax.jit(ps.fp_sampler(lm, assets.sched, n, setup.engine.problem.sample_chunk))
    t = time_fn(run, assets.params, assets.noise, repeats=repeats)
    return assets.noise.shape[0] * n / t


def paths(setup, p: int, repeats) -> dict:
    """One candidate at a time, P genomes: weights quantized at every step vs
    frozen once per genome, float32 vs bfloat16 integer convs (sample-steps/s)."""
    problem, assets = setup.engine.problem, setup.assets
    work = assets.noise.shape[0] * problem.space.num_steps
    g = ps._genomes(setup, p, seed=1)

    def per_step(a, genome):  # the earlier fitness: quantized_apply every step
        d = problem.space.decode(genome)
        return ps.fake_quant(problem, d.bits, d.timesteps)(a)

    frozen = lambda dt: jax.jit(dataclasses.replace(problem, conv_dtype=dt).sample)
    fns = dict(quantize_every_step_f32=jax.jit(per_step), frozen_f32=frozen(None))
    fns["frozen_bf16"] = frozen(jnp.bfloat16)
    out = {}
    for name, fn in fns.items():
        noise = () if name == "quantize_every_step_f32" else (assets.noise,)
        call = lambda fn=fn, noise=noise: [fn(assets, x, *noise) for x in g]
        out[name] = p * work / time_fn(call, repeats=repeats)
        print(name, out[name], flush=True)
    return out


def static_recompile(setup, genomes: int) -> dict:
    """Bits as compile-time constants (stock static-bit configs), a program per
    genome: seconds per genome, compile included."""
    problem, assets, times = setup.engine.problem, setup.assets, []
    for row in np.asarray(ps._genomes(setup, genomes, seed=2)):
        d = problem.space.decode(jnp.asarray(row))
        bits = jax.tree.map(np.asarray, d.bits)  # numpy: constants in the program
        t0 = time.perf_counter()
        run = jax.jit(ps.fake_quant(problem, bits, np.asarray(d.timesteps)))
        jax.block_until_ready(run(assets))
        times.append(time.perf_counter() - t0)
        print("static genome", times[-1], flush=True)
    return dict(seconds_per_genome=float(np.mean(times)), genomes=genomes)


def bf16_ceiling(n: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * n**3 / time_fn(f, a, a, repeats=5)


def _error(raw: dict, name: str, message: str) -> None:
    if isinstance(raw.get(name), list):  # rows measured so far stay as they are
        raw[f"{name}_error"] = message
    else:
        raw.setdefault(name, {})["error"] = message


def _section(raw: dict, name: str, fn, out: Path) -> None:
    """Runs one measurement; a failure is recorded, not fatal, and what was measured
    so far is written at once (a GPU call may be cut off at its time limit)."""
    t0 = time.perf_counter()
    try:
        raw[name] = fn()
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, run goes on
        _error(raw, name, f"{type(e).__name__}: {e}"[:500])
    except KeyboardInterrupt:  # the call's time limit: keep what was measured
        _error(raw, name, "interrupted")
        write_json(out.name, summarize(raw), out.parent)
        raise
    print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
    write_json(out.name, summarize(raw), out.parent)


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, dict) and "error" in v)


def summarize(raw: dict) -> dict:
    """The issue's keys, derived from the raw measurements present."""
    out = dict(raw)
    fp, rows = raw.get("fp_sample_steps_per_s"), raw.get("layout_measurements")
    timed = [r for r in (rows or {}).get("rows", []) if "sample_steps_per_s" in r]
    if rows:
        out["layouts"], out["memory"] = rows.get("rows", []), rows.get("memory", [])
    if timed:
        best = max(timed, key=lambda r: r["sample_steps_per_s"])
        out["best_layout"] = best
        if _ok(fp):
            out["quant_vs_fp_throughput"] = best["sample_steps_per_s"] / fp
        flops = raw["shapes"]["flops_per_sample_step"] * best["sample_steps_per_s"]
        out["achieved_flops_per_s"] = flops
        if _ok(ceiling := raw.get("bf16_ceiling_flops_per_s")):
            out["flops_fraction_of_bf16_ceiling"] = flops / ceiling
    paths_ = raw.get("paths_sample_steps_per_s")
    if _ok(paths_) and _ok(static := raw.get("static_aqt_recompile")):
        work = raw["shapes"]["samples"] * raw["shapes"]["steps"]
        out["traced_seconds_per_candidate"] = per = work / max(paths_.values())
        out["vs_static_aqt_recompile"] = static["seconds_per_genome"] / per
    if (torch := RESULTS / "torch_eager.json").is_file():
        ratio = json.loads(torch.read_text()).get("ratio_ours_over_torch")
        out["vs_torch_eager"] = ratio
        out["vs_torch_eager_source"] = "benchmarks/results/torch_eager.json"
    return out


def add_paper_search(out: Path, table_file: Path, fitness: str = DEFAULT_FITNESS) -> None:
    """paper_search_wall_s from a search_table.json's joint W6A6 seed-0 row of
    `fitness` (a row label; the default: the tool's default fitness); with
    `joint_race` rows, racing_search_wall_s and _fid_10k per seed, the full
    protocol's FIDs of the same seeds beside them."""
    raw, table = json.loads(out.read_text()), json.loads(table_file.read_text())
    key = lambda r: (r["method"], r["budget"], r.get("fitness", "fid"))
    of = lambda m: {r["seed"]: r for r in table["rows"] if key(r) == (m, "w6a6", fitness)}
    full, race = of("joint"), of("joint_race")
    if 0 not in full:
        raise SystemExit(f"{table_file}: no joint W6A6 row of fitness {fitness!r} "
                         "(seed 0); run search_table for it, or pass --fitness.")  # fmt: skip
    raw["paper_search_wall_s"] = full[0]["wall_s"]
    raw["paper_search"] = {"fitness": fitness, **{k: full[0].get(k) for k in ROW_PROVENANCE}}
    if race:
        seeds = sorted(race)
        raw["racing_search_wall_s"] = [race[s]["wall_s"] for s in seeds]
        raw["racing_search_fid_10k"] = [race[s]["fid_10k"] for s in seeds]
        raw["full_search_fid_10k"] = [full[s]["fid_10k"] for s in seeds if s in full]
        raw["racing_search"] = {"seeds": seeds, "protocol": race[seeds[0]]["protocol"],
                                "fitness": fitness,
                                **{k: race[seeds[0]][k] for k in ROW_PROVENANCE}}  # fmt: skip
    write_json(out.name, summarize(raw), out.parent)


ROW_PROVENANCE = ("device", "date", "command")
RACING = ("racing_search_wall_s", "racing_search_fid_10k", "full_search_fid_10k",
          "racing_search")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(ap, samples=2000, pops="8,16,40", chunks="1,2,4,8", fits_gib=60.0)
    add_args(ap, repeats=2, static_genomes=2, ceiling_n=8192, sampling_batch=2000)
    h = "search.sample_chunk of every other section (default: the config's)"
    ap.add_argument("--sample-chunk", type=int, help=h)
    h = "sample_chunks section: images drawn together per candidate (0: all)"
    ap.add_argument("--sample-chunks", default="0,1000,500,250", help=h)
    h = "add paper_search_wall_s (the joint W6A6 row's wall time, setup, compile and re-scoring included) from a search_table.json to an existing --out (no measuring)"
    ap.add_argument("--search-table", help=h)
    h = "with --search-table: the rows' fitness label (default: the default fitness's)"
    ap.add_argument("--fitness", default=DEFAULT_FITNESS, help=h)
    ap.add_argument("--out", default=str(RESULTS / "perf.json"))
    h = "a partial perf.json: keep its measured sections, run the rest"
    ap.add_argument("--resume", help=h)
    h = "with --resume: run just these sections (comma-separated), keep the others as they are in the resumed file (measured or not)"
    ap.add_argument("--only", help=h)
    return ap


def _sections(setup, a, raw: dict) -> dict:
    """Section name -> measurement, in the order they run."""
    pops, chunks, n = ints(a.pops), ints(a.chunks), a.repeats
    p, fits = min(pops), a.fits_gib * 2**30
    return dict(
        fp_sample_steps_per_s=lambda: fp_rate(setup, n),
        bf16_ceiling_flops_per_s=lambda: bf16_ceiling(a.ceiling_n),
        paths_sample_steps_per_s=lambda: paths(setup, p, n),
        static_aqt_recompile=lambda: static_recompile(setup, a.static_genomes),
        layout_measurements=lambda: layouts(setup, pops, chunks, fits, n, raw),
        sampling=lambda: ps.sampling(setup, a.sampling_batch, n, raw),
        sample_chunks=lambda: ps.sample_chunks(setup, ints(a.sample_chunks), p, n, raw),
    )


def _resume(raw: dict, sections: dict, resume: str, only: set | None) -> None:
    """Copies into `raw` the sections an earlier (cut-off) call on the same device
    measured: all of them, or with `only`, all but those."""
    done = json.loads(Path(resume).read_text())
    for name in sections:
        keep = name not in only if only else _ok(done.get(name))
        if keep and name in done:
            raw[name] = done[name]
    chain = done.get("resumed_from") or []  # every earlier call's command
    chain = chain if isinstance(chain, list) else [chain]
    raw["resumed_from"] = [*chain, done.get("command")]
    kept = ("paper_search_wall_s", "paper_search", *RACING)  # not measured here
    raw |= {k: done[k] for k in kept if k in done}


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    out = Path(a.out)
    if a.search_table:
        return add_paper_search(out, Path(a.search_table), a.fitness)
    t0 = time.perf_counter()
    setup = _setup(a.samples, "float32", a.sample_chunk)
    problem = setup.engine.problem
    shapes = dict(samples=a.samples, steps=problem.space.num_steps)
    shapes["image"] = list(setup.assets.noise.shape[1:])
    shapes["flops_per_sample_step"] = 2.0 * float(np.sum(setup.registry.macs))
    raw = dict(provenance(), shapes=shapes, conv_dtype=str(problem.conv_dtype))
    raw["sample_chunk"] = problem.sample_chunk
    sections = _sections(setup, a, raw)
    only = set(a.only.split(",")) if a.only else None
    if only and (only - set(sections) or not a.resume):
        msg = f"--only {a.only}: give sections of {list(sections)} with --resume"
        raise SystemExit(msg)
    if a.resume:
        _resume(raw, sections, a.resume, only)
    for name, fn in sections.items():
        if name not in raw:
            _section(raw, name, fn, out)
    raw["wall_s"] = time.perf_counter() - t0
    final = summarize(raw)
    write_json(out.name, final, out.parent)
    brief = {k: v for k, v in final.items() if not isinstance(v, (list, dict))}
    print(json.dumps(brief, indent=1, default=str))


if __name__ == "__main__":
    main()
