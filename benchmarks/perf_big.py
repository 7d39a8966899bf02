"""Issue 26, parts 2 and 4: the search's population evaluation and int8 / fp8 serving
on big models, each against bf16 full precision in the same process.

Project model code, random weights, 32x32x4 latents, bf16 compute: a DiT-XL/2-size DiT
(depth 28, width 1152, 16 heads, patch 2, 1000 classes: 674.8M params) and an SD
1.5-size UNet (ch 320, mult 1,2,4,4, 3 res blocks a level, self-attention at 32, 16, 8,
SD's three attending levels: 846M, 1.6% under SD's 860M; the third res block stands in
for SD's cross-attention and feed-forward). Parts, in this order, the JSON written
after each (a call cut off at its limit keeps the parts before); one starts only with
NEEDS_S of `--budget-s` left:
* `dit`, `unet`: P random genomes of the search's box through the search's population
  function (`Problem.sample` mapped `candidate_chunk` at a time as `population_fid`
  maps it: each genome's int8 kernels frozen at its traced bits, S images, N steps; no
  FID, a latent model has no feature net) vs the bf16 model on the same S images and
  N steps (images/s); the DiT's FLOP/s (2 x the registry's MACs) vs a bf16 jnp.dot.
* `serve` (batch S = 64) and `latency` (batch 1): the uniform W8A8 genome CONVERTed
  and served int8 (`export.convert` + `serve_apply`, what `serving.ServedModel` runs),
  and fp8 e4m3 where the GPU has it (`perf_serve.py`: dense kernels per channel,
  activations per tensor, fp8 gemms; convs and attention matmuls bf16), vs bf16.
* `torch`: `benchmarks/experiments/torch_dit.py` on the same P x S x N: eager
  per-layer fake quant, and torch.compile with the bits as tensors (if 150 s are left).
* `memory`: the DiT's population program compiled at chunk 2 too: the bytes a
  candidate adds, the largest chunk that fits (`search.fitness.chunk_memory`, which
  refuses one that does not). Until then the row is an estimate from the chunk-1
  program alone (its temp bytes counted per candidate: conservative).

  python -m benchmarks.perf_big --out $OUT/perf_big.json    # one H100, <= 9 min
  python -m benchmarks.perf_big --tiny --out /tmp/perf_big.json    # CPU, ~2 min
  python -m benchmarks.perf_big --parts torch,memory,latency \
      --resume benchmarks/results/perf_big.json --out $OUT/perf_big.json  # what a call skipped

Then copy it to benchmarks/results/ and run `python -m benchmarks.tables --docs`.
H100 time, estimated before the first run: 7-9 minutes, nearly all tracing and compiling;
the DiT's population program is ~39k lines of StableHLO (20 s to trace, 80 s to
compile on a 2-core CPU): ~2.5 min `dit`, ~2 `serve`, ~2.5 `unet`, 0.5-2 `torch`,
~1 each `memory` and `latency` (these two may be skipped by the budget).
Measured (H100, 2026-12-07): `dit` 207 s, `serve` 125 s, `unet` 201 s: 533 s, past the
default 520 s --budget-s before `torch`, `memory` and `latency`; give those a second
call with --resume.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.common import RESULTS, add_args, provenance, write_json  # noqa: E402
from benchmarks.perf import bf16_ceiling  # noqa: E402
from benchmarks.perf_serve import fp8_supported, median_time, serve  # noqa: E402
from tmpq_jax.diffusion.schedules import DiffusionConfig, make_noise_schedule  # noqa: E402
from tmpq_jax.errors import UserError  # noqa: E402
from tmpq_jax.models import dit, unet  # noqa: E402
from tmpq_jax.quant.registry import build_registry  # noqa: E402
from tmpq_jax.search.config import SearchConfig  # noqa: E402
from tmpq_jax.search.fitness import Assets, Problem, chunk_memory  # noqa: E402
from tmpq_jax.search.sampler import DDIM, Flow  # noqa: E402
from tmpq_jax.search.space import GenomeSpace  # noqa: E402

DIT = dict(big=dict(patch=2, width=1152, depth=28, heads=16, num_classes=1000),
           tiny=dict(patch=4, width=64, depth=2, heads=4, num_classes=10))
UNET = dict(big=dict(ch=320, ch_mult=(1, 2, 4, 4), num_res_blocks=3,
                     attn_resolutions=(32, 16, 8), num_heads=8, num_groups=32),
            tiny=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                      num_heads=2, num_groups=8))  # fmt: skip
TARGETS = dict(dit_quant_vs_bf16=0.9, unet_quant_vs_bf16=0.9, served_vs_bf16=1.3,
               dit_fraction_of_bf16_ceiling=0.4, dit_vs_torch_best=2.0)  # fmt: skip
# seconds of --budget-s a part needs left to start (guesses; a part cut off by the
# call's own limit loses only itself: the JSON is written after each part)
NEEDS_S = dict(dit=0, serve=60, unet=100, torch=30, memory=60, latency=60)
SCHED = make_noise_schedule(DiffusionConfig())


def _randomized(params, key):
    """Every kernel redrawn N(0, 0.02) (adaLN-Zero's zero gates would make each
    DiT block the identity); norms and biases as initialised."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    new = [0.02 * jax.random.normal(k, p.shape) if p.ndim > 1 else p
           for k, p in zip(keys, leaves, strict=True)]  # fmt: skip
    return jax.tree.unflatten(tree, new)


class Big:
    """A model, its f32 and bf16 params, registry, genome box and search problem."""

    def __init__(self, kind: str, size: str, a):
        if kind == "dit":
            cfg = dit.DiTConfig(32, 4, **DIT[size], dtype="bfloat16")
            self.model, params = dit.DiT(cfg), dit.init_params(cfg, jax.random.key(0))
            f32 = dit.DiT(dataclasses.replace(cfg, dtype="float32"))
            self.sampler, shift = Flow(1000, num_classes=cfg.num_classes,
                                       null_label=cfg.null_label), 1.0  # fmt: skip
            self.labels = jnp.arange(a.samples, dtype=jnp.int32) % cfg.num_classes
            t = jax.ShapeDtypeStruct((1,), jnp.float32)
            extra = (jax.ShapeDtypeStruct((1,), jnp.int32),)
        else:
            cfg = unet.UNetConfig(32, 4, **UNET[size], dtype="bfloat16")
            self.model, params = unet.UNet(cfg), unet.init_params(cfg, jax.random.key(0))
            f32 = unet.UNet(dataclasses.replace(cfg, dtype="float32"))
            self.sampler, shift, self.labels = DDIM(), None, None
            t, extra = jax.ShapeDtypeStruct((1,), jnp.int32), ()
        self.params = jax.jit(_randomized)(params, jax.random.key(1))
        self.bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), self.params)
        self.num_params = unet.count_params(params)
        x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
        # traced in float32: a bf16 model's kernels are casts, not the params CONVERT needs
        self.reg = build_registry(f32, {"params": params}, x, t, *extra)
        self.space = GenomeSpace.build(SearchConfig(num_steps=a.steps), self.reg, 1000, shift)
        self.ts = self.space.decode(self.space.seed).timesteps
        self.problem = Problem(self.model, self.reg, self.space, self.space.candidates,
                               candidate_chunk=a.chunk, sampler=self.sampler)  # fmt: skip
        self.noise = jax.random.normal(jax.random.key(2), (a.samples, 32, 32, 4))
        self.flops = 2.0 * float(self.reg.macs.sum())  # per image-forward
        print(f"{kind}: {self.num_params / 1e6:.1f}M params, {len(self.reg)} quantized ops, "
              f"{self.flops / 1e9:.1f} GFLOP a forward", flush=True)  # fmt: skip

    def sampler_fn(self, apply):
        """jit((weights, x, labels) -> images) of `apply(weights, x, t, *y)`."""
        def run(w, x, labels):
            fn = lambda x, t, *y: apply(w, x, t, *y)  # noqa: E731
            return self.sampler(fn, x, self.ts, SCHED, labels)
        return jax.jit(run)

    def fp(self):
        return self.sampler_fn(lambda p, *a: self.model.apply({"params": p}, *a))

    def population(self, chunk: int):
        """The search's population evaluation, as `Problem.population_fid` maps it."""
        pr = self.problem

        def run(assets, genomes):
            one = lambda g: pr.sample(assets, g, assets.noise, assets.labels)  # noqa: E731
            return lax.map(one, genomes, batch_size=chunk)
        return jax.jit(run)

    def assets(self, noise, labels):
        return Assets(self.params, None, SCHED, None, None, None, None, noise, labels=labels)


def memory_of(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program: temp, argument and output bytes."""
    if not (m := compiled.memory_analysis()):
        return None
    return dict(temp=int(m.temp_size_in_bytes), arguments=int(m.argument_size_in_bytes),
                output=int(m.output_size_in_bytes))  # fmt: skip


def memory_row(fixed: float, per: float, a, limit: int, how: str) -> dict:
    """Bytes a candidate, the largest chunk that fits `limit`; the refusal that
    --chunk (if it does not fit) or one chunk more than fits gets."""
    row = dict(bytes_per_candidate=per, fixed_bytes=fixed, device_bytes=limit, how=how,
               samples=a.samples, largest_chunk=chunk_memory(fixed, per, limit))  # fmt: skip
    for c in dict.fromkeys((a.chunk, row["largest_chunk"] + 1)):
        try:
            chunk_memory(fixed, per, limit, c)
        except UserError as e:
            row["refusal"] = str(e)
    return row


def quant_vs_bf16(m: Big, a, fp) -> dict:
    """P candidates' S images through the population function vs the bf16 model."""
    genomes = m.space.random(jax.random.key(3), a.population)
    assets = m.assets(m.noise, m.labels)
    pop = m.population(a.chunk).lower(assets, genomes).compile()
    t_q = median_time(pop, assets, genomes, repeats=a.repeats)
    t_fp = median_time(fp, m.bf16, m.noise, m.labels, repeats=a.repeats)
    work = a.population * a.samples
    out = dict(quant_images_per_s=work / t_q, bf16_images_per_s=a.samples / t_fp,
               population=a.population, samples=a.samples, steps=a.steps,
               chunk=a.chunk, memory=memory_of(pop))  # fmt: skip
    out["ratio"] = out["quant_images_per_s"] / out["bf16_images_per_s"]
    out["quant_flops_per_s"] = m.flops * a.steps * out["quant_images_per_s"]
    out["seconds_per_candidate"] = t_q / a.population
    return out


def summarize(raw: dict) -> dict:
    """The issue's rows: each measured target with its value, target and whether met."""
    out, d, s = dict(raw), raw.get("dit", {}), raw.get("serve", {})
    vals = dict(dit_quant_vs_bf16=d.get("ratio"), unet_quant_vs_bf16=raw.get("unet", {}).get("ratio"))
    if "quant_flops_per_s" in d and raw.get("bf16_ceiling_flops_per_s"):
        vals["dit_fraction_of_bf16_ceiling"] = d["quant_flops_per_s"] / raw["bf16_ceiling_flops_per_s"]
    if "bf16" in s:
        best = max((k for k in s if k in ("int8_w8a8", "fp8_e4m3")), default=None,
                   key=lambda k: s[k]["images_per_s"])  # fmt: skip
        vals["served_vs_bf16"] = best and s[best]["images_per_s"] / s["bf16"]["images_per_s"]
        out["served_best"] = best
    torch = raw.get("torch", {})
    if torch.get("best_seconds_per_candidate") and "seconds_per_candidate" in d:
        vals["dit_vs_torch_best"] = torch["best_seconds_per_candidate"] / d["seconds_per_candidate"]
        out["torch_ways_measured"] = [k.split("_")[0] for k in torch if k.endswith("s_per_candidate") and "best" not in k]
    if "largest_chunk" not in (raw.get("memory") or {}) and raw.get("memory_estimate"):
        why = (raw.get("memory") or {}).get("status") or (raw.get("memory") or {}).get("error")
        out["memory"] = dict(raw["memory_estimate"], chunk_2_not_compiled=why)
    for k, target in TARGETS.items():
        v = vals.get(k)
        out[k] = dict(value=v, target=target, met=v >= target) if v is not None else dict(
            value=None, target=target, status=_why(raw, k))  # fmt: skip
    return out


def _why(raw, key) -> str:
    part = "torch" if "torch" in key else ("serve" if "served" in key else key.split("_")[0])
    r = raw.get(part) or {}
    return r.get("status") or r.get("error") or "not measured"


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(ap, samples=64, population=2, steps=4, chunk=1, repeats=3, budget_s=520.0,
             ceiling_n=8192, parts=",".join(NEEDS_S), fp8="auto")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="tiny models and batches (CPU)")
    ap.add_argument("--out", default=str(RESULTS / "perf_big.json"))
    h = "an earlier perf_big.json of this device: its parts not in --parts are kept"
    ap.add_argument("--resume", default=None, help=h)
    return ap


def resumed(path: str, raw: dict, parts: list[str]) -> dict:
    """`raw` with the parts (and what they were measured against) of an earlier run
    on the same device that this run does not redo."""
    prev = json.loads(Path(path).read_text())
    if (prev.get("device"), prev.get("size")) != (raw["device"], raw["size"]):
        raise SystemExit(f"error: --resume {path} was measured on {prev.get('device')} "
                         f"({prev.get('size')}), this is {raw['device']} ({raw['size']}): "
                         "resume only on the same device and size.")  # fmt: skip
    kept = [k for k in NEEDS_S if k not in parts and k in prev]
    raw.update({k: prev[k] for k in kept})
    if "dit" in kept:  # the dit figures' own ceiling and memory estimate
        for k in ("bf16_ceiling_flops_per_s", "memory_estimate"):
            if k in prev:
                raw[k] = prev[k]
        if (raw.get("memory") or {}).get("chunk_2_not_compiled"):  # an estimate, not a part
            raw.pop("memory")
    raw["models"] = prev.get("models", {})
    raw["resumed_from"] = [*prev.get("resumed_from", []), dict(
        command=prev["command"], date=prev["date"], parts=kept)]  # fmt: skip
    return raw


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    t0, out, size = time.perf_counter(), Path(a.out), "tiny" if a.tiny else "big"
    if a.tiny:
        a.samples, a.steps, a.ceiling_n, a.repeats = min(a.samples, 4), 2, 256, 1
        jax.config.update("jax_disable_most_optimizations", True)  # CPU compiles
    dev = jax.devices()[0]
    fp8_off = fp8_supported(dev) if a.fp8 != "off" else "--fp8 off"
    if a.fp8 == "on" and fp8_off:
        raise SystemExit(f"error: --fp8 on: {fp8_off}")
    raw = dict(provenance(), size=size, models={}, targets=TARGETS, fp8=fp8_off or "measured")
    if fp8_off and a.tiny and a.fp8 == "auto":
        fp8_off, raw["fp8"] = None, "emulated by XLA's CPU backend (--tiny): the code path, not its speed"
    raw["device_memory_bytes"] = limit = (dev.memory_stats() or {}).get("bytes_limit") or (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # fmt: skip
    a100 = types.SimpleNamespace(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100")
    raw["fp8_refusal_on_an_a100"] = fp8_supported(a100)
    parts = a.parts.split(",")
    if a.resume:
        raw = resumed(a.resume, raw, parts)
    if "bf16_ceiling_flops_per_s" not in raw:
        raw["bf16_ceiling_flops_per_s"] = bf16_ceiling(a.ceiling_n)
    models, fps = {}, {}

    def part(name, fn):
        left = a.budget_s - (time.perf_counter() - t0)
        if name not in parts:  # kept from --resume, or marked as not asked
            raw.setdefault(name, dict(status="not asked (--parts)"))
            return
        if left < (1 if a.tiny else NEEDS_S[name]):
            raw[name] = dict(status=f"skipped: {left:.0f} s of --budget-s left")
        else:
            t1 = time.perf_counter()
            try:
                raw[name] = fn()
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                raw[name] = dict(error=f"{type(e).__name__}: {e}"[:500])
            raw[name]["wall_s"] = time.perf_counter() - t1
        print(f"[{name}] {raw[name]}", flush=True)
        write_json(out.name, summarize(raw), out.parent)

    def model(kind):
        if kind not in models:
            models[kind] = m = Big(kind, size, a)
            fps[kind] = m.fp()
            raw["models"][kind] = dict(params=m.num_params, quantized_ops=len(m.reg),
                                       gflops_per_forward=m.flops / 1e9)  # fmt: skip
        return models[kind]

    part("dit", lambda: quant_vs_bf16(model("dit"), a, fps["dit"]))
    if first := raw["dit"].get("memory"):  # estimate: every temp byte is a candidate's
        how = "XLA's memory analysis of the chunk-1 population program: its temp bytes counted per candidate (conservative)"
        raw["memory_estimate"] = memory_row(first["arguments"] + first["output"], first["temp"] / a.chunk, a, limit, how)
    part("serve", lambda: serve(model("dit"), a, fps["dit"], fp8_off, a.samples))
    part("unet", lambda: quant_vs_bf16(model("unet"), a, fps["unet"]))
    part("torch", lambda: torch_part(a, t0))
    part("memory", lambda: memory(model("dit"), a, limit, raw.get("dit", {}).get("memory")))
    part("latency", lambda: serve(model("dit"), a, fps["dit"], fp8_off, 1))
    raw["wall_s"] = time.perf_counter() - t0
    write_json(out.name, summarize(raw), out.parent)
    print({k: v for k, v in summarize(raw).items() if k in TARGETS})


def memory(m: Big, a, limit: int, first: dict | None) -> dict:
    """The population program compiled at chunk 2 as well (2 candidates, as the
    `dit` part's chunk-1 program): the bytes a candidate adds, the fixed rest."""
    if not first or (a.chunk, a.population) != (1, 2):
        return dict(status="needs the dit part's program at --chunk 1 --population 2")
    genomes = m.space.random(jax.random.key(3), 2)
    second = memory_of(m.population(2).lower(m.assets(m.noise, m.labels), genomes).compile())
    peak1, peak2 = (sum(x.values()) for x in (first, second))
    how = "XLA's memory analysis of the population program at chunks 1 and 2"
    return memory_row(2 * peak1 - peak2, peak2 - peak1, a, limit, how)


def torch_part(a, t0) -> dict:
    try:
        import torch  # noqa: F401
    except ImportError:
        return dict(status="torch not installed on the device")
    from benchmarks.experiments.torch_dit import measure

    left = a.budget_s - (time.perf_counter() - t0)
    cfg = dict(DIT["tiny" if a.tiny else "big"], image_size=32, channels=4)
    return measure(cfg, a.population, a.samples, a.steps, a.repeats, compile_ok=left > 150 or a.tiny)


if __name__ == "__main__":
    main()
