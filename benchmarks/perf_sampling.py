"""The sampling sections of `benchmarks.perf` (images, not the search's loop):
throughput and latency per mode, and each candidate's images drawn in chunks; with
the pieces both use (setup, genomes, the float and fake-quant samplers)."""

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.common import REPO, quant_eps, time_fn
from tmpq_jax.config import load_config
from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.diffusion.schedules import quad_timesteps, uniform_timesteps
from tmpq_jax.genome_file import read_genome
from tmpq_jax.quant import export
from tmpq_jax.search import SearchRunConfig, prepare
from tmpq_jax.search.fitness import map_in_chunks

GENOME = REPO / "docs" / "search_w6a6_seed0_result.json"
LATENCY_MODES = ("fp32_ddim100", "searched_fake_quant", "searched_int8_serve_f32")


def _setup(samples: int, conv_dtype: str, sample_chunk: int | None = None):
    cd = load_config(str(REPO / "configs" / "fmnist_search.py"), [])
    cd.search.num_samples, cd.search.conv_dtype = samples, conv_dtype
    if sample_chunk is not None:
        cd.search.sample_chunk = sample_chunk
    run = SearchRunConfig.from_configdict(cd)
    return prepare(run, REPO / "runs" / "perf", progress=False)


def fake_quant(problem, bits, timesteps):
    """assets -> images, the weights quantized at every step (`quantized_apply`)."""
    pr = problem

    def run(a):
        eps = quant_eps(pr.model, a.params, bits, pr.registry, a.qparams, pr.candidates)
        return _ddim(eps, a.sched, timesteps)(a.noise)

    return run


def _genomes(setup, p: int, seed: int = 0) -> jax.Array:
    return setup.space.random(jax.random.key(seed), p)


def _ddim(eps, sched, timesteps):
    ts = jnp.asarray(timesteps, jnp.int32)
    return lambda x: ddim_sample(jax.random.key(0), eps, x, ts, sched)


def fp_sampler(lm, sched, num_steps: int, chunk: int = 0):
    """(params, x_T) -> images: the float model's quad-step DDIM, `chunk` at a time."""
    ddim = lambda params: _ddim(lm.eps_fn(params), sched, quad_timesteps(num_steps))
    return lambda params, x: map_in_chunks(ddim(params), x, chunk)


def sample_chunks(setup, chunks, p: int, repeats, raw: dict) -> list:
    """Each candidate's S images drawn c at a time (`search.sample_chunk`) against all
    at once (c = 0), P genomes one at a time, and the FP sampling chunked alike: small
    chunks keep activations in L2 between the memory-bound norm/quantizer passes."""
    rows = raw.setdefault("sample_chunks", [])
    problem, assets, lm = setup.engine.problem, setup.assets, setup.lm
    n, s = problem.space.num_steps, assets.noise.shape[0]
    g = _genomes(setup, p, seed=1)
    for c in chunks:
        fid = jax.jit(dataclasses.replace(problem, sample_chunk=c).fid)
        q = time_fn(lambda fid=fid: [fid(assets, x) for x in g], repeats=repeats)
        fp = jax.jit(fp_sampler(lm, assets.sched, n, c))
        f = time_fn(fp, assets.params, assets.noise, repeats=repeats)
        row = dict(sample_chunk=c, quant_sample_steps_per_s=p * s * n / q)
        rows.append(dict(row, fp_sample_steps_per_s=s * n / f))
        print(rows[-1], flush=True)
    return rows


def sampling(setup, batch: int, repeats, raw: dict) -> list:
    """Images/s at `batch` and single-image latency: FP 100-step DDIM; the searched
    genome (its 10 timesteps) fake-quant, and served from int8 (f32 / bf16 convs)."""
    rows = raw.setdefault("sampling", [])
    lm, reg, assets = setup.lm, setup.registry, setup.assets
    genome = read_genome(GENOME, reg, num_timesteps=lm.diffusion.num_timesteps)
    qm = export.convert(lm.params, reg, genome.bits, assets.qparams, genome.candidates)
    # Weights and calibration are jit arguments, as `tmpq sample` passes them
    # (the last mode closes over the int8 weights as constants instead).
    fake = lambda v, q: quant_eps(lm.model, v, genome.bits, reg, q, genome.candidates)
    fp = lambda v, q: lm.eps_fn(v)

    def serve(dt):  # -> (weights, qparams) -> eps
        return lambda v, q: (
            lambda x, t: export.serve_apply(
                lm.model, v, x, t, registry=reg, conv_dtype=dt
            )
        )

    p, q, gts = lm.params, assets.qparams, genome.timesteps
    modes = dict(
        fp32_ddim100=(fp, p, uniform_timesteps(100)),
        searched_fake_quant=(fake, p, gts),
        searched_int8_serve_f32=(serve(None), qm, gts),
        searched_int8_serve_bf16=(serve(jnp.bfloat16), qm, gts),
        fp32_ddim10_quad=(fp, p, quad_timesteps(10)),
        # the int8 weights as compile-time constants (closed over), for contrast
        searched_int8_serve_f32_closed_over=(
            lambda v, q: serve(None)(qm, q),
            None,
            gts,
        ),
    )
    x = jax.random.normal(jax.random.key(3), (batch, *assets.noise.shape[1:]))
    for name, (eps, v, ts) in modes.items():
        ddim = lambda v, q, x, eps=eps, ts=ts: _ddim(eps(v, q), assets.sched, ts)(x)
        run, t_one = jax.jit(ddim), None
        t_big = time_fn(run, v, q, x, repeats=repeats)
        if name in LATENCY_MODES:
            t_one = time_fn(run, v, q, x[:1], repeats=max(repeats, 5))
        row = dict(mode=name, steps=len(ts), batch=batch, images_per_s=batch / t_big)
        rows.append(dict(row, latency_s=t_one))
        print(rows[-1], flush=True)
    return rows
