"""Min-MSE calibration of the quantization supernet, once for every candidate width.

TMPQ-DM (arXiv 2404.09532) calibrates once per candidate bit-width and keeps all
results, so a genome only *selects* them (`supernet.QParams`). This module is the
min-MSE part of that precision solver (no AdaRound / reconstruction):

* `calibration_set`: data-free, as in Q-Diffusion: the full-precision model's own
  DDIM (eta=0) trajectories from `num_samples` noises of a fixed key over a uniform
  schedule of `num_timesteps` steps; every (x_t, t) visited is kept.
* `collect_activation_stats`: one intercepted pass of the float model
  over the calibration set, in batches, keeping per operand (the input of a
  conv/dense; both operands of a matmul) the exact |x| max and a random subsample
  of at most `max_values` values (memory stays bounded).
* `search_weight_clip`: per output channel, the clip ratio (grid 1.0..0.5) that
  minimises the kernel's fake-quant MSE, for every width, with the very quantizer
  the supernet applies (`numerics.fake_quant_weight`), vectorised over ratios,
  widths and channels.
* `search_act_bound`: per tensor, the |x| bound (grid of fractions 1.0..0.3 of the
  absmax) minimising the activation fake-quant MSE on the subsample, for every
  width (`numerics.fake_quant_activation`). A pinned softmax operand is
  calibrated like the rest; the supernet only ever reads its 8-bit column.
* `calibrate`: all of it for a `LoadedModel`; `save_calibration` /
  `load_calibration`: one directory (orbax arrays + `calibration.json`), written
  atomically, checked against the registry and candidate set on load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax.diffusion.samplers import ddim_step
from tmpq_jax.diffusion.schedules import NoiseSchedule, uniform_timesteps
from tmpq_jax.errors import UserError
from tmpq_jax.quant import intercept, numerics, ops
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import DEFAULT_CANDIDATES, QParams, check_candidates

# Grids, largest first: on a tie argmin keeps the unclipped range.
WEIGHT_RATIOS = np.linspace(1.0, 0.5, 21).astype(np.float32)
ACT_FRACTIONS = np.linspace(1.0, 0.3, 29).astype(np.float32)
MAX_VALUES = 2**16


# ----------------------------------------------------------------------------
# The calibration set.


@functools.partial(jax.jit, static_argnums=0)
def _trajectories(model, params, sched: NoiseSchedule, timesteps, x_T):
    """x_t (and t) at every DDIM step (eta=0) from x_T: [N, B, ...], [N, B]."""
    t_seq = timesteps[::-1]
    t_prev = jnp.concatenate([jnp.array([-1], jnp.int32), timesteps[:-1]])[::-1]
    ab = lambda t: jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], 1.0)

    def body(x, inp):
        t, tp = inp
        tb = jnp.full((x.shape[0],), t)
        eps = model.apply({"params": params}, x, tb)
        x_next = ddim_step(x, eps, ab(t), ab(tp), 0.0, jnp.zeros_like(x))
        return x_next, (x, tb)

    _, (xs, ts) = jax.lax.scan(body, x_T, (t_seq, t_prev))
    return xs, ts


def calibration_set(
    lm, key: jax.Array, num_timesteps: int = 20, num_samples: int = 32
) -> tuple[jax.Array, ...]:
    """(x_t f32[N*S, H, W, C], t int32[N*S]) from the float model's own DDIM
    trajectories: S = `num_samples` noises drawn from `key`, N = `num_timesteps`
    uniform steps; step-major order (first the S inputs at the largest t). A flow
    model's inputs come from `calibration_flow.flow_calibration_set`."""
    if num_samples < 1:
        raise UserError(f"calibration samples {num_samples}: use at least 1.")
    if lm.prediction == "velocity":
        from tmpq_jax.quant.calibration_flow import flow_calibration_set

        return flow_calibration_set(lm, key, num_timesteps, num_samples)
    ts = jnp.asarray(uniform_timesteps(num_timesteps, lm.sched.num_timesteps))
    xs, tt = _trajectories(
        lm.model, lm.params, lm.sched, ts, lm.noise(key, num_samples)
    )
    return xs.reshape(-1, *xs.shape[2:]), tt.reshape(-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Activation statistics.


def _stats_fn(model, registry: LayerRegistry, per_batch: int):
    """Jitted (variables, x, t, key, *extra) -> {(layer, operand): (absmax,
    values[per_batch])}; `extra`: the model's other inputs (labels)."""

    def fn(variables, x, t, key, *extra):
        seen: dict[tuple[int, int], list[jax.Array]] = {}

        def collect(call):
            i = registry.index_of_site(call.site)
            if i is not None:
                left, right = ops.operands(registry[i], call)
                both = registry[i].kind == "matmul"
                for j, a in enumerate((left, right) if both else (left,)):
                    seen.setdefault((i, j), []).append(jnp.ravel(a).astype(jnp.float32))
            return call.original()

        with intercept.intercept(collect):
            model.apply(variables, x, t, *extra)
        # One random draw for all operands (one RNG op compiles much faster than
        # one per operand); float32 u * n reaches every index below n ~ 2**24.
        u = jax.random.uniform(key, (len(seen), per_batch))
        out = {}
        for r, ((i, j), parts) in enumerate(sorted(seen.items())):
            flat = jnp.concatenate(parts)
            n = flat.shape[0]
            idx = jnp.minimum((u[r] * n).astype(jnp.int32), n - 1)
            out[(i, j)] = (jnp.max(jnp.abs(flat)), flat[idx])
        return out

    return jax.jit(fn)


def layer_weights(model, variables: Any, registry: LayerRegistry, *args) -> dict:
    """{layer: f32[rows, C]}: every conv/dense weight as the op sees it (contracted
    axes first, output channels last), from one forward on `args`."""

    @jax.jit
    def fn(v, *a):
        got: dict = {}

        def grab(call):
            i = registry.index_of_site(call.site)
            if i is not None and registry[i].kind != "matmul":
                c = ops.canonical(registry[i], call)
                got[i] = ops.weight_2d(c.right, c.right_contracting)
            return call.original()

        with intercept.intercept(grab):
            model.apply(v, *a)
        return got

    return jax.device_get(fn(variables, *args))


def _batch_size(n: int, batch_size: int) -> int:
    """The largest divisor of n that is <= batch_size (one compiled shape)."""
    return max(d for d in range(1, min(n, batch_size) + 1) if n % d == 0)


def collect_activation_stats(
    model: nn.Module,
    variables: Any,
    registry: LayerRegistry,
    xs: jax.Array,
    ts: jax.Array,
    key: jax.Array,
    max_values: int = MAX_VALUES,
    batch_size: int = 64,
    progress: bool = False,
    extra: tuple = (),
) -> dict[tuple[int, int], tuple[float, np.ndarray]]:
    """{(layer, operand): (exact |x| max, f32[max_values] values sampled uniformly
    with replacement)} over the calibration inputs; operand 0 is a conv/dense input
    or a MatMul's left operand, 1 a MatMul's right operand."""
    n = int(xs.shape[0])
    b = _batch_size(n, batch_size)
    n_batches = n // b
    per_batch = -(-max_values // n_batches)
    fn = _stats_fn(model, registry, per_batch)
    absmax: dict = {}
    values: dict = {}
    for s in tqdm(
        range(n_batches), disable=not progress, desc="calibrate: activations"
    ):
        out = fn(
            variables,
            xs[s * b : (s + 1) * b],
            ts[s * b : (s + 1) * b],
            jax.random.fold_in(key, s),
            *(e[s * b : (s + 1) * b] for e in extra),
        )
        for k, (m, v) in jax.device_get(out).items():
            absmax[k] = max(absmax.get(k, 0.0), float(m))
            values.setdefault(k, []).append(v)
    missing = [registry[i].name for i in range(len(registry)) if (i, 0) not in absmax]
    if missing:
        raise UserError(
            f"layers {missing[:3]} were never called on the calibration inputs; "
            "the registry does not match the model."
        )
    return {k: (absmax[k], np.concatenate(values[k])[:max_values]) for k in absmax}


# ----------------------------------------------------------------------------
# The searches (grid, vectorised over grid points, widths and channels).


@jax.jit
def act_mse_grid(values: jax.Array, bounds: jax.Array, bit_widths: jax.Array):
    """f32[K, G]: MSE of `values` fake-quantized per-tensor at width k, bound g."""

    def one(bits, bound):
        xq, _ = numerics.fake_quant_activation(values, numerics.ActQuant(bits, bound))
        return jnp.mean(jnp.square(xq - values))

    return jax.vmap(lambda b: jax.vmap(lambda g: one(b, g))(bounds))(bit_widths)


def search_act_bound(
    values: np.ndarray,
    absmax: float,
    bit_widths: Sequence[int],
    fractions: np.ndarray = ACT_FRACTIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """(bound f32[K], mse f32[K, G]): per width, the |x| bound among
    `fractions * absmax` with the least fake-quant MSE on `values`."""
    absmax = float(absmax) if absmax > 0 else 1.0
    bounds = jnp.asarray(fractions, jnp.float32) * absmax
    mse = np.asarray(
        act_mse_grid(
            jnp.asarray(values, jnp.float32), bounds, jnp.asarray(bit_widths, jnp.int32)
        )
    )
    return np.asarray(bounds)[mse.argmin(-1)], mse


@jax.jit
def weight_mse_grid(w2d: jax.Array, ratios: jax.Array, bit_widths: jax.Array):
    """f32[K, G, C]: per-channel summed squared error of the kernel `w2d`
    [fan_in, C] fake-quantized per output channel at width k, clip ratio g."""

    def one(bits, ratio):
        clip = jnp.full((w2d.shape[-1],), ratio, jnp.float32)
        wq, _ = numerics.fake_quant_weight(w2d, numerics.WeightQuant(bits, clip))
        return jnp.sum(jnp.square(wq - w2d), axis=0)

    return jax.vmap(lambda b: jax.vmap(lambda r: one(b, r))(ratios))(bit_widths)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def search_weight_clip(
    kernel: jax.Array,
    bit_widths: Sequence[int],
    ratios: np.ndarray = WEIGHT_RATIOS,
) -> tuple[np.ndarray, np.ndarray]:
    """(clip f32[K, C_out], mse f32[K, G, C_out]): per width and output channel
    (last kernel axis), the ratio to the channel absmax with the least fake-quant
    MSE (mean over the channel's weights). The kernel is flattened to
    [fan_in, C_out] (the same per-channel quantization) and zero-padded to powers
    of two, which changes no channel's absmax or error, so few shapes compile."""
    c = kernel.shape[-1]
    w2d = np.asarray(kernel, np.float32).reshape(-1, c)
    fan_in = w2d.shape[0]
    padded = np.zeros((_pow2_at_least(fan_in), _pow2_at_least(c)), np.float32)
    padded[:fan_in, :c] = w2d
    sse = weight_mse_grid(
        jnp.asarray(padded),
        jnp.asarray(ratios, jnp.float32),
        jnp.asarray(bit_widths, jnp.int32),
    )
    mse = np.asarray(sse)[..., :c] / fan_in
    return np.asarray(ratios)[mse.argmin(1)].astype(np.float32), mse


# ----------------------------------------------------------------------------
# The whole solver.


def calibration_widths(candidates: Sequence[int], registry: LayerRegistry) -> tuple:
    """The widths to calibrate: the candidates, then any pinned width not among them."""
    cands = check_candidates(candidates)
    pinned = sorted({int(b) for b in registry.pinned_lhs_bits if b} - set(cands))
    return cands + tuple(pinned)


def calibrate_model(
    model: nn.Module,
    params: Any,
    registry: LayerRegistry,
    xs: jax.Array,
    ts: jax.Array,
    key: jax.Array,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    max_values: int = MAX_VALUES,
    batch_size: int = 64,
    progress: bool = False,
    extra: tuple = (),
) -> tuple[QParams, dict]:
    """Min-MSE `QParams` for `model.apply({'params': params}, x, t, *extra)` on
    the calibration inputs (xs, ts, *extra), for every width of
    `calibration_widths`."""
    widths = calibration_widths(candidates, registry)
    stats = collect_activation_stats(
        model,
        {"params": params},
        registry,
        xs,
        ts,
        key,
        max_values,
        batch_size,
        progress,
        extra,
    )
    n, k = len(registry), len(widths)
    act_bound = np.ones((n, 2, k), np.float32)  # operand 1 of conv/dense: unused
    absmax = np.ones((n, 2), np.float32)
    act_gain = np.ones((n, 2, k), np.float32)  # MSE at absmax / chosen MSE
    first = (xs[:1], ts[:1], *(e[:1] for e in extra))
    weights = layer_weights(model, {"params": params}, registry, *first)
    w_clip: list[np.ndarray | None] = []
    w_gain: list[np.ndarray | None] = []
    for i, layer in enumerate(
        tqdm(registry, disable=not progress, desc="calibrate: layers", unit="layer")
    ):
        for j in (0, 1) if layer.kind == "matmul" else (0,):
            m, values = stats[(i, j)]
            bound, mse = search_act_bound(values, m, widths)
            act_bound[i, j], absmax[i, j] = bound, m
            act_gain[i, j] = mse[:, 0] / np.maximum(mse.min(-1), 1e-30)
        if layer.kind == "matmul":
            w_clip.append(None)
            w_gain.append(None)
            continue
        clip, mse = search_weight_clip(weights[i], widths)
        w_clip.append(clip)
        w_gain.append(mse[:, 0].sum(-1) / np.maximum(mse.min(1).sum(-1), 1e-30))
    qparams = QParams(
        bit_widths=widths,
        act_bound=jnp.asarray(act_bound),
        w_clip=tuple(None if c is None else jnp.asarray(c) for c in w_clip),
    )
    info = dict(
        bit_widths=widths,
        num_pairs=int(xs.shape[0]),
        max_values=max_values,
        act_absmax=absmax,
        act_mse_gain=act_gain,
        w_mse_gain=w_gain,
    )
    return qparams, info


def model_fingerprint(card: dict) -> str:
    """A short hash of a model card (config + provenance)."""
    blob = json.dumps(card, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def calibrate(
    lm,
    key: jax.Array,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    num_timesteps: int = 20,
    num_samples: int = 32,
    progress: bool = True,
    *,
    registry: LayerRegistry | None = None,
    max_values: int = MAX_VALUES,
    batch_size: int = 64,
) -> tuple[QParams, dict]:
    """Calibrates a `LoadedModel` once for every candidate width: (QParams, info).

    `key` draws the calibration noises (fold 0) and the activation subsample
    (fold 1). `info` holds the settings (for `save_calibration`), per-operand
    absmax and the MSE gains of the chosen ranges over the unclipped ones."""
    start = time.perf_counter()
    registry = registry if registry is not None else lm.layer_registry()
    xs, ts, *extra = calibration_set(
        lm, jax.random.fold_in(key, 0), num_timesteps, num_samples
    )
    qparams, info = calibrate_model(
        lm.model,
        lm.params,
        registry,
        xs,
        ts,
        jax.random.fold_in(key, 1),
        candidates,
        max_values,
        batch_size,
        progress,
        tuple(extra),
    )
    info.update(
        candidates=tuple(int(c) for c in candidates),
        num_timesteps=num_timesteps,
        num_samples=num_samples,
        layer_names=registry.names,
        model_fingerprint=model_fingerprint(lm.card),
        seconds=time.perf_counter() - start,
    )
    return qparams, info
