"""Ours vs the original's way: population evaluation in JAX vs PyTorch eager.

  python -m benchmarks.experiments.torch_eager [--population 8 --samples 2000] [--repeats 2]
      [--extras channels_last,fp,fid,compile] [--parity-batch 16] [--parity-only]
      [--conv-dtype float32|bfloat16] [--torch-first] [--no-tf32]
      [--no-cudnn-benchmark] [--out-dir DIR]

Needs PyTorch (the optional extra: `pip install -e .[bench]`; CI never installs it).
Theirs: what a TMPQ-DM user would run instead of this project, the original's way:
the same UNet with the same weights ported to PyTorch (`benchmarks/experiments/torch_unet.py`),
per-layer fake-quant modules whose bit-widths are Python attributes switched per
candidate, the candidates evaluated one after another by an eager DDIM loop (N = 10
steps on S samples each, under `torch.no_grad()`). Ours: the sampling part of the
search's fitness (`Problem.sample` as `Problem.population_fid` maps it, with the
search's `conv_dtype` unless `--conv-dtype` says otherwise), P candidates x S samples
x N steps in one jitted program (`lax.map` over `candidate_chunk` vmapped genomes),
timed after its compile. Both sides sample the same P genomes (the W6A6 quad seed genome, then random
genomes of the joint box) from the same fixed noise batch, in one process on one
device (`XLA_PYTHON_CLIENT_PREALLOCATE=false`: JAX and torch share the GPU memory).

Parity first, failing loudly (TF32 off in torch, JAX at 'highest' precision): the
port's full-precision eps vs the Flax model's (max |diff|, expect ~1e-5); one
quantized candidate's eps vs `quantized_apply`, whole model (the original-style
fake-quant order and AQT's integer order) and each layer alone quantized (the rest
in float), and its N-step samples. Quantized differences are measured against the
quantization error itself (mean |torch - jax| / mean |jax - float|): float
differences of ~1e-6 flip a few roundings, and the flips cascade through the 65
quantized layers, so the whole-model figure is compared with our own model against
itself with its biases scaled by 1 + 1e-6; the per-layer figures are the tight check.
Timing then runs at both frameworks' float32 defaults on the GPU (TF32 on: JAX's
default precision uses it; `--no-tf32` turns it off in torch).

Extras (each its own row): `channels_last` (torch.inference_mode + channels_last,
a tuned eager), `fp` (the torch port without fake quant, min(P, 2) candidates: the
cost of the quantizers), `compile` (torch.compile with the quantizer scalars as
buffers so one graph serves every candidate; off by default: minutes of compile),
and `fid`: our whole `population_fid` (sampling + FID; the torch side computes no
FID; needs S above the 128 feature dims).

Writes benchmarks/results/torch_eager.json on a GPU (torch_eager_<platform>.json
elsewhere); `vs_torch_eager` (also as `ratio_ours_over_torch`, which
benchmarks/perf.py merges into perf.json) = torch eager seconds per candidate over
ours (speed, ours over theirs).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # before jax is imported

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from benchmarks.common import provenance, write_json
from benchmarks.experiments.quant_sensitivity import make_eps_fn
from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.metrics import REF_STATS_FILE, load_feature_net, load_reference_stats
from tmpq_jax.quant import load_calibration, quantized_apply, unet_registry
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.sampling import load_model
from tmpq_jax.search.config import SearchConfig
from tmpq_jax.search.fitness import Assets, Problem
from tmpq_jax.search.setup import NOISE_STREAM
from tmpq_jax.search.space import GenomeSpace
from tmpq_jax.serving import SHIPPED_CALIBRATION

FP_TOL = 1e-3  # max |eps_torch - eps_jax| in float32 (expect ~1e-5)
# Quantized: mean |torch - jax| over mean |jax - float| (see `diff_stats`).
# Whole model: float differences of ~1e-6 flip roundings, which cascade through the
# 65 quantized layers (our own model with its biases scaled by 1 + 1e-6 moves by
# 0.15-0.35 x the quantization error on the CPU: `quant_eps_jax_vs_itself_params_1e-6`);
# so the port must only stay below the quantization error itself. Each layer alone
# quantized (the others in float) is the tight check.
QUANT_REL_TOL = 1.0
LAYER_REL_TOL = 0.2


def _import_torch():
    try:
        import torch
    except ImportError:
        sys.exit(
            "benchmarks/experiments/torch_eager.py needs PyTorch: pip install -e .[bench] "
            "(the optional extra; not installed by CI)"
        )
    return torch


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model dir (default: shipped)")
    ap.add_argument("--calibration", default=None, help="default: shipped")
    ap.add_argument("--population", type=int, default=8, help="P candidates")
    ap.add_argument("--samples", type=int, default=2000, help="S samples each")
    ap.add_argument("--steps", type=int, default=10, help="N DDIM steps")
    ap.add_argument("--candidate-chunk", type=int, default=1, help="ours: vmapped")
    ap.add_argument(
        "--conv-dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="ours: conv dtype of the integer values (default: the search's)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="best of, every row")
    ap.add_argument("--seed", type=int, default=0, help="draws the random genomes")
    ap.add_argument(
        "--extras",
        default="channels_last,fp,fid",
        help="comma list of channels_last, fp, fid, compile, none",
    )
    ap.add_argument("--parity-batch", type=int, default=16)
    ap.add_argument(
        "--no-per-layer", action="store_true", help="skip the per-layer parity"
    )
    ap.add_argument("--parity-only", action="store_true", help="no timing")
    ap.add_argument("--torch-threads", type=int, default=0, help="CPU only; 0: default")
    ap.add_argument("--no-tf32", action="store_true", help="torch timing w/o TF32")
    ap.add_argument("--no-cudnn-benchmark", action="store_true")
    ap.add_argument(
        "--torch-first",
        action="store_true",
        help="load torch's CUDA libraries before JAX's (default: JAX's first)",
    )
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    extras = {e for e in args.extras.split(",") if e and e != "none"}
    bad = extras - {"channels_last", "fp", "fid", "compile"}
    if bad:
        ap.error(f"--extras: unknown {sorted(bad)}")
    if args.population < 1 or args.samples < 1 or args.repeats < 1:
        ap.error("--population, --samples and --repeats must be >= 1")
    args.extras = extras
    return args


# ----------------------------------------------------------------------------
# The JAX side: the search's own fitness pieces.


@dataclasses.dataclass
class Ours:
    lm: object
    registry: object
    qparams: object
    space: GenomeSpace
    problem: Problem
    assets: Assets
    genomes: jax.Array  # int32[P, D]


def build_ours(args) -> Ours:
    lm = load_model(args.checkpoint)
    registry = unet_registry(lm.config)
    cfg = SearchConfig(
        num_steps=args.steps,
        num_samples=args.samples,
        population=max(args.population, 4),
        candidate_chunk=args.candidate_chunk,
    )
    conv_dtype = args.conv_dtype or getattr(cfg, "conv_dtype", "float32")
    qparams, _ = load_calibration(
        args.calibration or SHIPPED_CALIBRATION,
        registry,
        cfg.candidates,
        model_fingerprint(lm.card),
    )
    space = GenomeSpace.build(cfg, registry, lm.diffusion.num_timesteps)
    c = lm.config
    noise = jax.random.normal(
        jax.random.key(NOISE_STREAM),
        (args.samples, c.image_size, c.image_size, c.channels),
    )
    net = mu = sigma = sqrt_sigma = None
    feature_net = load_feature_net(None)
    if args.samples > feature_net.feature_dim:  # FID needs more samples than dims
        net = feature_net
        stats = load_reference_stats(Path(net.path) / REF_STATS_FILE, net)
        mu, sigma, sqrt_sigma = (
            jnp.asarray(stats[k], jnp.float32)
            for k in ("mu_test", "sigma_test", "sqrt_sigma_test")
        )
    assets = Assets(lm.params, qparams, lm.sched, net, mu, sigma, sqrt_sigma, noise)
    problem = Problem(
        lm.model,
        registry,
        space,
        cfg.candidates,
        candidate_chunk=args.candidate_chunk,
        conv_dtype=None if conv_dtype == "float32" else jnp.dtype(conv_dtype),
    )
    seed = jnp.asarray(space.seed)[None]
    rand = space.random(jax.random.key(args.seed), max(args.population - 1, 0))
    genomes = jnp.concatenate([seed, rand])[: args.population]
    return Ours(lm, registry, qparams, space, problem, assets, genomes)


def jax_population_sample(ours: Ours):
    chunk = min(ours.problem.candidate_chunk, ours.genomes.shape[0])

    @jax.jit
    def run(assets, genomes):
        return jax.lax.map(
            lambda g: ours.problem.sample(assets, g, assets.noise),
            genomes,
            batch_size=chunk,
        )

    return run


def time_jax(fn, *args, repeats: int) -> tuple[float, float, object]:
    """(compile + first run seconds, best-of-`repeats` seconds, last output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best, out


# ----------------------------------------------------------------------------
# The torch side.


class Theirs:
    """The ported UNet, its quantizer settings per candidate, its sampler."""

    def __init__(self, torch, tu, ours: Ours, device):
        self.torch, self.tu, self.device = torch, tu, device
        lm, reg, qp = ours.lm, ours.registry, ours.qparams
        self.model = tu.TorchUNet(**dataclasses.asdict(lm.config))
        tu.load_flax_params(self.model, jax.tree.map(np.asarray, lm.params))
        self.model.to(device).eval()
        self.names, self.kinds = reg.names, reg.kinds
        self.pinned = reg.pinned_lhs_bits.tolist()
        self.widths = qp.bit_widths
        self.act_bound = np.asarray(qp.act_bound)
        self.w_clip = [
            None if c is None else torch.tensor(np.array(c), device=device)
            for c in qp.w_clip
        ]
        self.abar = np.asarray(lm.sched.alphas_cumprod, np.float32)
        dec = jax.vmap(ours.space.decode)(ours.genomes)
        self.timesteps = np.asarray(dec.timesteps)
        self.w_bits, self.a_bits = (
            np.asarray(dec.bits.w_bits),
            np.asarray(dec.bits.a_bits),
        )

    def set_candidate(self, i: int | None) -> None:
        """Candidate i's bits (None: full precision) on every layer: Python ints."""
        w = a = None
        if i is not None:
            w, a = self.w_bits[i].tolist(), self.a_bits[i].tolist()
        self.tu.configure(
            self.model,
            self.names,
            self.kinds,
            self.pinned,
            self.widths,
            self.act_bound,
            self.w_clip,
            w,
            a,
        )

    def nchw(self, x) -> object:
        return self.torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(
            self.device
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def run_population(self, x_T, cands, quantized=True, model=None) -> list:
        """One candidate after another: set bits, DDIM over its timesteps."""
        model = model or self.model
        outs = []
        for i in cands:
            self.set_candidate(i if quantized else None)
            outs.append(self.tu.ddim_sample(model, x_T, self.timesteps[i], self.abar))
        return outs


def time_torch(
    theirs: Theirs, x_T, cands, repeats, quantized=True, model=None, ctx=None
):
    """(first-candidate warm-up seconds, best-of-`repeats` seconds of all `cands`,
    outputs of the last repeat)."""
    torch = theirs.torch
    ctx = ctx or torch.no_grad
    with ctx():
        t0 = time.perf_counter()
        theirs.run_population(x_T, cands[:1], quantized, model)
        theirs.sync()
        warm = time.perf_counter() - t0
        best, outs = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = theirs.run_population(x_T, cands, quantized, model)
            theirs.sync()
            best = min(best, time.perf_counter() - t0)
    return warm, best, outs


def set_tf32(torch, on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


# ----------------------------------------------------------------------------
# Parity.


def diff_stats(a, b, fp=None) -> dict:
    """|a - b| statistics; with `fp` (the float reference), `rel_to_quant_error`:
    mean |a - b| over mean |b - fp|, i.e. the port's disagreement measured against
    the quantization error itself (<< 1: same quantized model)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b)
    out = {
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "frac_differing": float(np.mean(d > 0)),
        "frac_diff_gt_1e-5": float(np.mean(d > 1e-5)),
        "frac_diff_gt_1e-3": float(np.mean(d > 1e-3)),
        "ref_mean_abs": float(np.abs(b).mean()),
    }
    if fp is not None:
        q_err = float(np.abs(b - np.asarray(fp, np.float64)).mean())
        out["quant_error_mean_abs"] = q_err
        out["rel_to_quant_error"] = float(d.mean()) / max(q_err, 1e-12)
    return out


def perturbed(params, rel: float):
    """`params` with every bias and GroupNorm scale multiplied by 1 + rel."""
    flat = traverse_util.flatten_dict(params)
    flat = {
        k: v * (1.0 + rel) if k[-1] in ("bias", "scale") else v for k, v in flat.items()
    }
    return traverse_util.unflatten_dict(flat)


def parity(ours: Ours, theirs: Theirs, n: int, cand: int, per_layer: bool) -> dict:
    """The port against our model on the same inputs: full precision, one quantized
    candidate (whole model; and each layer alone quantized, the rest in float), and
    that candidate's N-step samples. TF32 off in torch, JAX at 'highest'."""
    torch, tu = theirs.torch, theirs.tu
    lm, reg = ours.lm, ours.registry
    n = min(n, ours.assets.noise.shape[0])
    x = ours.assets.noise[:n]
    t = jnp.linspace(0, lm.diffusion.num_timesteps - 1, n).astype(jnp.int32)
    xt, tt = theirs.nchw(x), torch.from_numpy(np.array(t)).to(theirs.device)
    to_nhwc = lambda y: y.detach().cpu().numpy().transpose(0, 2, 3, 1)
    genome = ours.genomes[cand]
    dec = ours.space.decode(genome)
    set_tf32(torch, False)
    out: dict = {
        "batch": n,
        "timesteps": "linspace(0, T-1, batch), one per sample",
        "candidate": int(cand),
        "candidate_w_bits": theirs.w_bits[cand].tolist(),
        "candidate_a_bits": theirs.a_bits[cand].tolist(),
        "settings": "torch TF32 off; jax default_matmul_precision('highest')",
    }
    L = len(reg)
    with jax.default_matmul_precision("highest"):
        e_fp = jax.jit(lambda p, x, t: lm.model.apply({"params": p}, x, t))(
            lm.params, x, t
        )

        @jax.jit
        def e_q(p, qp, x, t, bits):
            return quantized_apply(
                lm.model,
                {"params": p},
                x,
                t,
                bits=bits,
                registry=reg,
                qparams=qp,
                candidates=ours.problem.candidates,
            )

        e_quant = e_q(lm.params, ours.qparams, x, t, dec.bits)
        # The noise floor: our own model with its float-only params (biases, norm
        # scales; the quantized kernels absorb such changes) scaled by 1 + 1e-6.
        e_self = e_q(perturbed(lm.params, 1e-6), ours.qparams, x, t, dec.bits)
        x0_jax = jax.jit(ours.problem.sample)(ours.assets, genome, x)
        x0_jax_fp = jax.jit(
            lambda p, x, ts: ddim_sample(
                jax.random.key(0), lm.eps_fn(p), x, ts, lm.sched
            )
        )(lm.params, x, dec.timesteps)
        e_layers = []
        if per_layer:  # one jitted function, the layer mask traced
            masked = make_eps_fn(lm, reg, ours.qparams)
            for i in range(L):
                mask = jnp.zeros((L,), jnp.int32).at[i].set(1)
                e_layers.append(np.asarray(masked(x[None], t[None], dec.bits, mask)[0]))
        e_fp, e_quant, e_self, x0_jax, x0_jax_fp = jax.device_get(
            (e_fp, e_quant, e_self, x0_jax, x0_jax_fp)
        )
    out["quant_eps_jax_vs_itself_params_1e-6"] = diff_stats(e_self, e_quant, e_fp)

    ts = theirs.timesteps[cand]
    with torch.no_grad():
        theirs.set_candidate(None)
        out["fp_eps"] = diff_stats(to_nhwc(theirs.model(xt, tt)), e_fp)
        x0 = tu.ddim_sample(theirs.model, xt, ts, theirs.abar)
        out["fp_samples"] = diff_stats(to_nhwc(x0), x0_jax_fp)
        theirs.set_candidate(cand)
        for order in ("fake", "aqt"):
            theirs.model.set_order(order)
            e = to_nhwc(theirs.model(xt, tt))
            out[f"quant_eps_{order}_order"] = diff_stats(e, e_quant, e_fp)
        theirs.model.set_order("fake")
        x0 = tu.ddim_sample(theirs.model, xt, ts, theirs.abar)
        out["quant_samples"] = diff_stats(to_nhwc(x0), x0_jax, x0_jax_fp)
        layers = []
        for i, name in enumerate(reg.names if per_layer else ()):
            tu.enable_only(theirs.model, {name})
            s = diff_stats(to_nhwc(theirs.model(xt, tt)), e_layers[i], e_fp)
            layers.append({"layer": name, **{k: s[k] for k in LAYER_KEYS}})
        tu.enable_only(theirs.model, None)
    if layers:
        worst = max(layers, key=lambda r: r["rel_to_quant_error"])
        out["per_layer_worst"] = worst
        out["per_layer"] = layers
    return out


LAYER_KEYS = (
    "max_abs_diff",
    "mean_abs_diff",
    "quant_error_mean_abs",
    "rel_to_quant_error",
)


def check_parity(p: dict) -> list[str]:
    bad = []
    if not p["fp_eps"]["max_abs_diff"] <= FP_TOL:
        bad.append(f"fp eps max |diff| {p['fp_eps']['max_abs_diff']:.3g} > {FP_TOL}")
    checks = [
        (f"quantized eps ({o} order)", p[f"quant_eps_{o}_order"], QUANT_REL_TOL)
        for o in ("fake", "aqt")
    ]
    checks.append(("quantized samples", p["quant_samples"], QUANT_REL_TOL))
    if "per_layer" in p:
        for r in p["per_layer"]:
            checks.append((f"layer {r['layer']} alone quantized", r, LAYER_REL_TOL))
    for what, s, tol in checks:
        if not s["rel_to_quant_error"] <= tol:
            bad.append(
                f"{what}: mean |torch - jax| is {s['rel_to_quant_error']:.3g} x the "
                f"quantization error (allowed {tol})"
            )
    return bad


# ----------------------------------------------------------------------------


def row(seconds: float, cands: int, samples: int, steps: int, **extra) -> dict:
    return {
        "candidates": cands,
        "seconds_total": seconds,
        "seconds_per_candidate": seconds / cands,
        "sample_steps_per_s": cands * samples * steps / seconds,
        **extra,
    }


def torch_info(torch, device) -> dict:
    info = {"version": torch.__version__, "device_type": device.type}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def main() -> None:
    args = parse_args()
    if args.torch_first:
        torch = _import_torch()
    jax_dev = jax.devices()[0]  # initialises JAX's backend (and its CUDA libraries)
    if not args.torch_first:
        torch = _import_torch()
    from benchmarks.experiments import torch_unet as tu

    on_gpu = jax_dev.platform == "gpu"
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu and not torch.cuda.is_available():
        sys.exit("JAX sees a GPU but torch does not: install a CUDA build of torch.")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    ours = build_ours(args)
    theirs = Theirs(torch, tu, ours, device)
    P, S, N = args.population, args.samples, args.steps
    print(
        f"jax {jax.__version__} on {jax_dev.device_kind}; torch {torch.__version__} on {device}"
    )
    print(f"{P} candidates x {S} samples x {N} DDIM steps; {len(ours.registry)} layers")

    # -- parity (TF32 off, JAX 'highest') ---------------------------------------
    par = parity(
        ours,
        theirs,
        args.parity_batch,
        cand=min(1, P - 1),
        per_layer=not args.no_per_layer,
    )
    for k in (
        "fp_eps",
        "fp_samples",
        "quant_eps_fake_order",
        "quant_eps_aqt_order",
        "quant_eps_jax_vs_itself_params_1e-6",
        "quant_samples",
        "per_layer_worst",
    ):
        if k in par:
            r = par[k]
            rel = r.get("rel_to_quant_error")
            print(
                f"parity {k}: max |diff| {r['max_abs_diff']:.3g}, mean {r['mean_abs_diff']:.3g}"
                + ("" if rel is None else f", {rel:.3g} x the quantization error")
                + (f" ({r['layer']})" if "layer" in r else "")
            )
    failures = check_parity(par)
    par["passed"] = not failures
    for f in failures:
        print("PARITY FAILED:", f, file=sys.stderr)
    payload = {
        **provenance(),
        "jax": {
            "version": jax.__version__,
            "device": jax_dev.device_kind,
            "platform": jax_dev.platform,
        },
        "torch": torch_info(torch, device),
        "parity": par,
    }
    name = "torch_eager.json" if on_gpu else f"torch_eager_{jax_dev.platform}.json"
    if args.parity_only:
        print(write_json(name, payload, args.out_dir))
        if failures:
            sys.exit("parity check failed: " + "; ".join(failures))
        return

    # -- timing at each framework's default precision -----------------------------
    set_tf32(torch, not args.no_tf32)
    rows: dict = {}
    pop_sample = jax_population_sample(ours)
    first, best, x0_jax = time_jax(
        pop_sample, ours.assets, ours.genomes, repeats=args.repeats
    )
    rows["jax_population_sample"] = row(best, P, S, N, compile_and_first_run_s=first)
    print("jax sample", rows["jax_population_sample"])
    if "fid" in args.extras and ours.assets.net is not None:
        first, best, fids = time_jax(
            jax.jit(ours.problem.population_fid),
            ours.assets,
            ours.genomes,
            repeats=args.repeats,
        )
        rows["jax_population_fid"] = row(
            best, P, S, N, compile_and_first_run_s=first, fids=np.asarray(fids).tolist()
        )
        print("jax sample+fid", rows["jax_population_fid"])

    x_T = theirs.nchw(ours.assets.noise)
    cands = list(range(P))
    warm, best, outs = time_torch(theirs, x_T, cands, args.repeats)
    x0_torch = np.stack([to.cpu().numpy().transpose(0, 2, 3, 1) for to in outs])
    rows["torch_eager"] = row(
        best,
        P,
        S,
        N,
        warmup_first_candidate_s=warm,
        how="torch.no_grad(), NCHW, fake-quant modules (bits as Python ints), "
        "weights re-quantized every forward, one candidate after another",
        samples_vs_jax=diff_stats(x0_torch, np.asarray(x0_jax)),
    )
    del outs, x0_torch
    print(
        "torch eager",
        {k: v for k, v in rows["torch_eager"].items() if k != "samples_vs_jax"},
    )

    if "channels_last" in args.extras:
        theirs.model.to(memory_format=torch.channels_last)
        xc = x_T.contiguous(memory_format=torch.channels_last)
        warm, best, _ = time_torch(
            theirs, xc, cands, args.repeats, ctx=torch.inference_mode
        )
        theirs.model.to(memory_format=torch.contiguous_format)
        rows["torch_eager_inference_mode_channels_last"] = row(
            best, P, S, N, warmup_first_candidate_s=warm
        )
        del xc
        print("torch channels_last", rows["torch_eager_inference_mode_channels_last"])
    if "fp" in args.extras:
        fp_cands = cands[: min(P, 2)]
        warm, best, _ = time_torch(theirs, x_T, fp_cands, args.repeats, quantized=False)
        rows["torch_eager_fp"] = row(
            best,
            len(fp_cands),
            S,
            N,
            warmup_first_candidate_s=warm,
            how="the same port with every quantizer off (full precision)",
        )
        print("torch fp", rows["torch_eager_fp"])
    if "compile" in args.extras:
        theirs.set_candidate(0)
        theirs.model.to_tensor_mode()
        compiled = torch.compile(theirs.model)
        warm, best, _ = time_torch(theirs, x_T, cands, args.repeats, model=compiled)
        rows["torch_compile"] = row(
            best,
            P,
            S,
            N,
            compile_and_first_candidate_s=warm,
            how="torch.compile (default mode), quantizer scalars as buffers filled "
            "per candidate (one graph for every genome)",
        )
        print("torch compile", rows["torch_compile"])

    ours_s = rows["jax_population_sample"]["seconds_per_candidate"]
    theirs_s = rows["torch_eager"]["seconds_per_candidate"]
    payload |= {
        "settings": {
            "population": P,
            "samples": S,
            "ddim_steps": N,
            "candidate_chunk": args.candidate_chunk,
            "jax_conv_dtype": str(jnp.dtype(ours.problem.conv_dtype or jnp.float32)),
            "repeats": args.repeats,
            "genomes": "the W6A6 quad seed genome, then random genomes of the joint box "
            f"(seed {args.seed}), bits {list(ours.problem.candidates)}",
            "genome_array": np.asarray(ours.genomes).tolist(),
            "timing_precision": "jax default; torch TF32 "
            + ("off" if args.no_tf32 else "on (matmul and cuDNN)")
            if on_gpu
            else "float32 (CPU)",
            "cudnn_benchmark": not args.no_cudnn_benchmark,
            "xla_python_client_preallocate": os.environ[
                "XLA_PYTHON_CLIENT_PREALLOCATE"
            ],
        },
        "timing": rows,
        "vs_torch_eager": theirs_s / ours_s,
        "ratio_ours_over_torch": theirs_s / ours_s,  # the key benchmarks/perf.py reads
        "vs_torch_eager_definition": "torch eager seconds per candidate / ours "
        "(jax_population_sample): speed, ours over theirs",
    }
    # Every torch row over our sampling (and over our sampling + FID).
    payload["vs_ours_by_row"] = {
        k: {
            o: r["seconds_per_candidate"] / rows[o]["seconds_per_candidate"]
            for o in ("jax_population_sample", "jax_population_fid")
            if o in rows
        }
        for k, r in rows.items()
        if k.startswith("torch")
    }
    print(f"vs_torch_eager = {payload['vs_torch_eager']:.2f}")
    print(write_json(name, payload, args.out_dir))
    if failures:
        sys.exit(
            "parity check failed (see above and the JSON's 'parity'): "
            + "; ".join(failures)
        )


if __name__ == "__main__":
    main()
