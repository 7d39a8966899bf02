"""The search against the hardware and its own alternatives.

Every comparison's two sides are timed in this one process, on the shipped model
and the paper protocol's shapes (S = 2000 samples a candidate, N = 10 steps):

  * layouts: P = 8, 16, 40 candidates (40: what a paper generation evaluates),
    samples + FID, in chunks of c vmapped genomes, c = 1 (one candidate at a time
    through one jitted function) up to c = P (the whole population vmapped; pass
    it in --chunks). One compiled program per chunk
    size serves every P; chunks are dispatched back to back (asynchronously, the
    device never waits for the host), as `lax.map(batch_size=c)` runs them;
  * the plain full-precision forward of the same model on the same images;
  * the weights quantized at every step (`quantized_apply`, the fake-quant path)
    against frozen once per genome (`export.freeze` + SERVE), and float32 against
    bfloat16 integer convolutions;
  * bits as compile-time constants, recompiled for every genome (the naive JAX
    way) against the traced genome;
  * achieved FLOP/s (FLOPs from the layer registry) against a bf16 matmul ceiling
    measured here;
  * peak memory of the chunked program against chunk size (XLA's memory analysis);
  * sampling: FP 100-step DDIM, the searched genome fake-quant and served int8.

  python -m benchmarks.perf                      # everything, on the GPU
  python -m benchmarks.perf --samples 136 --pops 4 --chunks 1,4 --repeats 1 \
      --static-genomes 1 --ceiling-n 256 --sampling-batch 2 --out /tmp/p.json  # CPU
  python -m benchmarks.perf --resume benchmarks/results/perf.json  # missing parts
  python -m benchmarks.perf --resume benchmarks/results/perf.json --only sampling

Writes benchmarks/results/perf.json after every section (merging the PyTorch-eager
ratio from torch_eager.json); `--search-table` adds the paper search's wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, provenance, time_fn, write_json
from benchmarks.perf_sampling import (
    _ddim,
    _genomes,
    fp_sampler,
    sample_chunks,
    sampling,
)
from tmpq_jax.config import load_config
from tmpq_jax.quant.supernet import quantized_apply
from tmpq_jax.search import SearchRunConfig, prepare

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def _setup(samples: int, conv_dtype: str, sample_chunk: int | None = None):
    cd = load_config(str(REPO / "configs" / "fmnist_search.py"), [])
    cd.search.num_samples = samples
    cd.search.conv_dtype = conv_dtype
    if sample_chunk is not None:
        cd.search.sample_chunk = sample_chunk
    run = SearchRunConfig.from_configdict(cd)
    return prepare(run, REPO / "runs" / "perf", progress=False)


def _chunk_fn(problem):
    """fid of c vmapped genomes: the body `lax.map(batch_size=c)` runs per chunk."""
    return jax.jit(jax.vmap(problem.fid, in_axes=(None, 0)))


def _run_chunks(fn, assets, genomes, c: int):
    outs = [fn(assets, genomes[i : i + c]) for i in range(0, genomes.shape[0], c)]
    return jnp.concatenate(outs)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return dict(temp_bytes=int(m.temp_size_in_bytes), peak_bytes=int(total))


def _name(c: int, p: int) -> str:
    return "one_at_a_time" if c == 1 else ("vmap_all" if c == p else "chunked")


def layouts(setup, pops, chunks, fits_bytes, repeats, into: dict) -> dict:
    """Sample-steps/s per (P, chunk) and peak memory per chunk size, appended to
    `into` ({"rows": [], "memory": []}) as they come, so a cut-off run keeps them.
    Each chunk size compiles once (chunks should divide every P)."""
    problem, assets = setup.engine.problem, setup.assets
    work = assets.noise.shape[0] * problem.space.num_steps  # sample-steps a genome
    rows, memory = into.setdefault("rows", []), into.setdefault("memory", [])
    for c in chunks:
        compiled = _chunk_fn(problem).lower(assets, _genomes(setup, c)).compile()
        memory.append(dict(chunk=c, **_memory(compiled)))
        print(memory[-1], flush=True)
        for p in [p for p in pops if c <= p and p % c == 0]:
            row = dict(P=p, chunk=c, layout=_name(c, p))
            if memory[-1].get("peak_bytes", 0) > fits_bytes:
                rows.append(dict(row, skipped="does not fit in device memory"))
                continue
            g = _genomes(setup, p)
            t = time_fn(_run_chunks, compiled, assets, g, c, repeats=repeats)
            rows.append(dict(row, seconds=t, sample_steps_per_s=p * work / t))
            print(rows[-1], flush=True)
    return into


def fp_rate(setup, repeats) -> float:
    """Plain float32 forward sampling of the same S images, the same 10 steps, in
    the search's sample chunks: sample-steps/s."""
    lm, assets, n = setup.lm, setup.assets, setup.space.num_steps
    run = jax.jit(fp_sampler(lm, assets.sched, n, setup.engine.problem.sample_chunk))
    return (
        assets.noise.shape[0]
        * n
        / time_fn(run, assets.params, assets.noise, repeats=repeats)
    )


def paths(setup, p: int, repeats) -> dict:
    """One candidate at a time, P genomes: weights quantized at every step vs
    frozen once per genome, float32 vs bfloat16 integer convs (sample-steps/s)."""
    problem, assets = setup.engine.problem, setup.assets
    work = assets.noise.shape[0] * problem.space.num_steps
    g = _genomes(setup, p, seed=1)

    def per_step(a, genome):  # the earlier fitness: quantized_apply every step
        d = problem.space.decode(genome)
        eps = lambda x, t: quantized_apply(
            problem.model,
            {"params": a.params},
            x,
            t,
            bits=d.bits,
            registry=problem.registry,
            qparams=a.qparams,
            candidates=problem.candidates,
        )
        return _ddim(eps, a.sched, d.timesteps)(a.noise)

    out = {}
    fns = dict(
        quantize_every_step_f32=jax.jit(per_step),
        frozen_f32=jax.jit(dataclasses.replace(problem, conv_dtype=None).sample),
        frozen_bf16=jax.jit(
            dataclasses.replace(problem, conv_dtype=jnp.bfloat16).sample
        ),
    )
    for name, fn in fns.items():
        if name == "quantize_every_step_f32":
            call = lambda fn=fn: [fn(assets, x) for x in g]
        else:
            call = lambda fn=fn: [fn(assets, x, assets.noise) for x in g]
        out[name] = p * work / time_fn(call, repeats=repeats)
        print(name, out[name], flush=True)
    return out


def static_recompile(setup, genomes: int) -> dict:
    """Bits as compile-time constants (stock static-bit configs): every genome
    compiles its own program. Seconds per genome, compile included."""
    problem, assets = setup.engine.problem, setup.assets
    g = np.asarray(_genomes(setup, genomes, seed=2))
    times = []
    for row in g:
        d = problem.space.decode(jnp.asarray(row))
        bits = jax.tree.map(np.asarray, d.bits)  # numpy: constants in the program
        ts = np.asarray(d.timesteps)

        def run(a, bits=bits, ts=ts):
            eps = lambda x, t: quantized_apply(
                problem.model,
                {"params": a.params},
                x,
                t,
                bits=bits,
                registry=problem.registry,
                qparams=a.qparams,
                candidates=problem.candidates,
            )
            return _ddim(eps, a.sched, ts)(a.noise)

        t0 = time.perf_counter()
        jax.block_until_ready(jax.jit(run)(assets))
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
        if _ok(raw.get("bf16_ceiling_flops_per_s")):
            out["flops_fraction_of_bf16_ceiling"] = (
                flops / raw["bf16_ceiling_flops_per_s"]
            )
    paths_, static = (
        raw.get("paths_sample_steps_per_s"),
        raw.get("static_aqt_recompile"),
    )
    if _ok(paths_) and _ok(static):
        work = raw["shapes"]["samples"] * raw["shapes"]["steps"]
        fastest = max(paths_.values())
        out["traced_seconds_per_candidate"] = work / fastest
        out["vs_static_aqt_recompile"] = static["seconds_per_genome"] / (work / fastest)
    torch_file = RESULTS / "torch_eager.json"
    if torch_file.is_file():
        out["vs_torch_eager"] = json.loads(torch_file.read_text()).get(
            "ratio_ours_over_torch"
        )
        out["vs_torch_eager_source"] = "benchmarks/results/torch_eager.json"
    return out


def add_paper_search(out: Path, table_file: Path) -> None:
    """paper_search_wall_s from a search_table.json's joint W6A6 seed-0 row."""
    raw = json.loads(out.read_text())
    table = json.loads(table_file.read_text())
    rows = [
        r
        for r in table["rows"]
        if r["method"] == "joint" and r["budget"] == "w6a6" and r["seed"] == 0
    ]
    raw["paper_search_wall_s"] = rows[-1]["wall_s"]
    raw["paper_search"] = {k: table.get(k) for k in ("device", "date", "command")}
    write_json(out.name, summarize(raw), out.parent)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--pops", default="8,16,40")
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--fits-gib", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--static-genomes", type=int, default=2)
    ap.add_argument("--ceiling-n", type=int, default=8192)
    ap.add_argument("--sampling-batch", type=int, default=2000)
    ap.add_argument(
        "--sample-chunk",
        type=int,
        help="search.sample_chunk of every other section (default: the config's)",
    )
    ap.add_argument(
        "--sample-chunks",
        default="0,1000,500,250",
        help="sample_chunks section: images drawn together per candidate (0: all)",
    )
    ap.add_argument(
        "--search-table",
        help="add paper_search_wall_s (the joint W6A6 row's wall time, setup, "
        "compile and re-scoring included) from a search_table.json to an existing "
        "--out (no measuring)",
    )
    ap.add_argument("--out", default=str(RESULTS / "perf.json"))
    ap.add_argument(
        "--resume",
        help="a partial perf.json: keep its measured sections, run the rest",
    )
    ap.add_argument(
        "--only",
        help="with --resume: run just these sections (comma-separated), keep the "
        "others as they are in the resumed file (measured or not)",
    )
    return ap


def _sections(setup, a, raw: dict) -> dict:
    """Section name -> measurement, in the order they run."""
    pops = [int(v) for v in a.pops.split(",")]
    chunks = [int(v) for v in a.chunks.split(",")]
    return dict(
        fp_sample_steps_per_s=lambda: fp_rate(setup, a.repeats),
        bf16_ceiling_flops_per_s=lambda: bf16_ceiling(a.ceiling_n),
        paths_sample_steps_per_s=lambda: paths(setup, min(pops), a.repeats),
        static_aqt_recompile=lambda: static_recompile(setup, a.static_genomes),
        layout_measurements=lambda: layouts(
            setup,
            pops,
            chunks,
            a.fits_gib * GiB,
            a.repeats,
            raw.setdefault("layout_measurements", {}),
        ),
        sampling=lambda: sampling(
            setup, a.sampling_batch, a.repeats, raw.setdefault("sampling", [])
        ),
        sample_chunks=lambda: sample_chunks(
            setup,
            [int(v) for v in a.sample_chunks.split(",")],
            min(pops),
            a.repeats,
            raw.setdefault("sample_chunks", []),
        ),
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
    for key in ("paper_search_wall_s", "paper_search"):  # not measured here
        if key in done:
            raw[key] = done[key]


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    out = Path(a.out)
    if a.search_table:
        add_paper_search(out, Path(a.search_table))
        return
    t0 = time.perf_counter()
    setup = _setup(a.samples, "float32", a.sample_chunk)
    problem = setup.engine.problem
    raw = dict(
        provenance(),
        shapes=dict(
            samples=a.samples,
            steps=problem.space.num_steps,
            image=list(setup.assets.noise.shape[1:]),
            flops_per_sample_step=2.0 * float(np.sum(setup.registry.macs)),
        ),
        conv_dtype=str(problem.conv_dtype),
        sample_chunk=problem.sample_chunk,
    )
    sections = _sections(setup, a, raw)
    only = set(a.only.split(",")) if a.only else None
    if only and (only - set(sections) or not a.resume):
        raise SystemExit(f"--only {a.only}: give sections of {list(sections)} "
                         "with --resume")  # fmt: skip
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
