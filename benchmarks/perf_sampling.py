"""The sampling sections of `benchmarks.perf` (images, not the search's loop):
sampling throughput and latency per mode, and each candidate's images drawn in
chunks; with the shared pieces both halves use (the float sampler, genomes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import time_fn
from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.diffusion.schedules import quad_timesteps, uniform_timesteps
from tmpq_jax.genome_file import read_genome
from tmpq_jax.quant import export
from tmpq_jax.quant.supernet import quantized_apply
from tmpq_jax.search.fitness import map_in_chunks

GENOME = (
    Path(__file__).resolve().parent.parent / "docs" / "search_w6a6_seed0_result.json"
)
LATENCY_MODES = ("fp32_ddim100", "searched_fake_quant", "searched_int8_serve_f32")


def _genomes(setup, p: int, seed: int = 0) -> jax.Array:
    return setup.space.random(jax.random.key(seed), p)


def _ddim(eps, sched, timesteps):
    ts = jnp.asarray(timesteps, jnp.int32)
    return lambda x: ddim_sample(jax.random.key(0), eps, x, ts, sched)


def sample_chunks(setup, chunks, p: int, repeats, rows: list) -> list:
    """Each candidate's S images drawn c at a time (`search.sample_chunk`, a
    `lax.map` over chunks) against all at once (c = 0), one candidate at a time,
    P genomes; the plain FP sampling chunked alike, for a fair ratio. Smaller
    chunks keep a layer's activations in L2 (50 MB on an H100) between the
    memory-bound GroupNorm/SiLU/quantizer passes. Rows appended as measured."""
    problem, assets, lm = setup.engine.problem, setup.assets, setup.lm
    n, s = problem.space.num_steps, assets.noise.shape[0]
    g = _genomes(setup, p, seed=1)
    for c in chunks:
        pc = dataclasses.replace(problem, sample_chunk=c)
        fid = jax.jit(pc.fid)
        q = time_fn(lambda fid=fid: [fid(assets, x) for x in g], repeats=repeats)
        fp = jax.jit(fp_sampler(lm, assets.sched, n, c))
        f = time_fn(fp, assets.params, assets.noise, repeats=repeats)
        rows.append(
            dict(
                sample_chunk=c,
                quant_sample_steps_per_s=p * s * n / q,
                fp_sample_steps_per_s=s * n / f,
            )
        )
        print(rows[-1], flush=True)
    return rows


def fp_sampler(lm, sched, num_steps: int, chunk: int = 0):
    """(params, x_T) -> images: the plain float model's DDIM over the quad steps,
    `chunk` images at a time (0: all)."""

    def run(params, x):
        eps = lambda x, t: lm.model.apply({"params": params}, x, t)
        return map_in_chunks(_ddim(eps, sched, quad_timesteps(num_steps)), x, chunk)

    return run


def sampling(setup, batch: int, repeats, rows: list) -> list:
    """Images/s at `batch` and single-image latency: FP 100-step DDIM; the searched
    genome (its 10 timesteps) fake-quant, and served from int8 (f32 / bf16 convs).
    Rows are appended to `rows` as measured (kept if the call is cut off)."""
    lm, reg, assets = setup.lm, setup.registry, setup.assets
    genome = read_genome(GENOME, reg, num_timesteps=lm.diffusion.num_timesteps)
    qm = export.convert(lm.params, reg, genome.bits, assets.qparams, genome.candidates)
    # Weights and calibration are jit arguments, as `tmpq sample` passes them
    # (the last mode closes over the int8 weights as constants instead).
    fake = lambda v, q: (
        lambda x, t: quantized_apply(
            lm.model,
            {"params": v},
            x,
            t,
            bits=genome.bits,
            registry=reg,
            qparams=q,
            candidates=genome.candidates,
        )
    )
    serve = lambda dt: (
        lambda v, q: (
            lambda x, t: export.serve_apply(
                lm.model, v, x, t, registry=reg, conv_dtype=dt
            )
        )
    )
    fp = lambda v, q: lambda x, t: lm.model.apply({"params": v}, x, t)
    p, q = lm.params, assets.qparams
    modes = dict(
        fp32_ddim100=(fp, p, uniform_timesteps(100)),
        searched_fake_quant=(fake, p, genome.timesteps),
        searched_int8_serve_f32=(serve(None), qm, genome.timesteps),
        searched_int8_serve_bf16=(serve(jnp.bfloat16), qm, genome.timesteps),
        fp32_ddim10_quad=(fp, p, quad_timesteps(10)),
        # the int8 weights as compile-time constants (closed over), for contrast
        searched_int8_serve_f32_closed_over=(
            lambda v, q: serve(None)(qm, q),
            None,
            genome.timesteps,
        ),
    )
    for name, (eps, v, ts) in modes.items():
        run = jax.jit(
            lambda v, q, x, eps=eps, ts=ts: _ddim(eps(v, q), assets.sched, ts)(x)
        )
        x = jax.random.normal(jax.random.key(3), (batch, *assets.noise.shape[1:]))
        t_big = time_fn(run, v, q, x, repeats=repeats)
        t_one = None
        if name in LATENCY_MODES:
            t_one = time_fn(run, v, q, x[:1], repeats=max(repeats, 5))
        rows.append(
            dict(
                mode=name,
                steps=len(ts),
                batch=batch,
                images_per_s=batch / t_big,
                latency_s=t_one,
            )
        )
        print(rows[-1], flush=True)
    return rows
