"""Sequential GPTQ (`tmpq calibrate --method gptq_seq`): each layer's Hessian from
the inputs the *already quantized* model gives it, as GPTQ's paper does, and
(by default) a target that lets a layer make up for the error of the layers
before it.

Layer-wise GPTQ (`gptq.py`) fits every layer on the float model's inputs X, so
the error a quantized layer passes on is never seen by the layers after it.
Here one forward pass per width runs the float model and the quantized model
side by side (the batch holds the calibration set twice: float half, quantized
half). When the pass reaches a layer, its float inputs X and quantized inputs
X_q (after the earlier layers' GPTQ weights and the activation quantizer) are
both at hand; the layer is rounded there and its quantized half runs with the
new weight, so every later layer sees it.

Target. `compensate=False`: GPTQ on H = X_q^T X_q for ||X_q (W - W_q)|| (the
paper). `compensate=True` (the default, `gptq_seq`): the goal is the float
output, ||X W - X_q W_q||. With C = X_q^T X, that is
||X W - X_q W'|| + ||X_q (W' - W_q)|| for the least-squares weight
W' = W + (H + damp)^-1 X_q^T (X - X_q) W, so GPTQ rounds W' (GPTAQ's asymmetric
calibration, arXiv 2504.02692, in its two-step form). Where X_q == X, W' == W.

The held-out check of `gptq.py` is kept: fitted on even batches, a layer and
width keeps round-to-nearest where it loses to it on the odd ones (by the float
output error above). Activations of the quantized half run at the widest
candidate (the A of W4A8); MatMul layers are quantized there too.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax.quant import intercept, numerics, ops
from tmpq_jax.quant.gptq import (
    ACT_ORDER,
    PERCDAMP,
    ROWS_PER_BATCH,
    _gptq_widths,
    _kernels,
    exact_f32,
    layer_inputs,
    unweight_2d,
)
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QParams, QuantBits, operand_specs

HALF_BATCH = 64  # samples per held-out group (gptq.py's batches: even / odd)
_PERMS: dict = {}  # fast_inputs' column permutation per conv site


def _act_side(layer, call) -> str:
    """The primitive operand ('lhs' | 'rhs') holding the activation."""
    if call.prim == "conv":
        return "lhs"
    flip = layer.weight_operand == 0 or layer.swap
    return "rhs" if flip else "lhs"


def _halves(call, layer, n):
    """(float call, quantized call): the batch [2n, ...] split on axis 0."""
    sides = ("lhs", "rhs") if layer.kind == "matmul" else (_act_side(layer, call),)
    out = []
    for k in (0, 1):
        sl = {s: getattr(call, s)[k * n : (k + 1) * n] for s in sides}
        out.append(dataclasses.replace(call, **sl))
    return out


def fast_inputs(layer, call, cache: dict):
    """`gptq.layer_inputs`, for a conv by `lax.conv_general_dilated_patches` (a
    gather, where layer_inputs runs an identity kernel of fan_in^2 MACs a row),
    its columns put in the weight's row order by a permutation found once per
    layer on a random one-sample probe (cached in `cache` by site)."""
    if call.prim != "conv" or call.params.get("lhs_dilation", (1,)) not in (
        (1,),
        (1, 1),
    ):
        return layer_inputs(layer, call)
    p = call.params
    dn = p["dimension_numbers"]
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        return None
    window = [call.rhs.shape[a] for a in dn.rhs_spec[2:]]

    def patches(lhs):
        out = jax.lax.conv_general_dilated_patches(
            lhs, window, p["window_strides"], p["padding"],
            rhs_dilation=p.get("rhs_dilation"), dimension_numbers=dn,
        )  # fmt: skip
        out = jnp.moveaxis(out, dn.out_spec[1], -1)
        return out.reshape(-1, out.shape[-1]).astype(jnp.float32)

    if call.site not in cache:
        probe = jax.random.normal(jax.random.key(0), (1, *call.lhs.shape[1:]))
        ref = layer_inputs(
            layer, dataclasses.replace(call, lhs=probe.astype(call.lhs.dtype))
        )
        got = patches(probe.astype(call.lhs.dtype))
        sq = lambda a: jnp.sum(a * a, axis=0)
        dist = sq(ref)[:, None] + sq(got)[None, :] - 2 * ref.T @ got
        perm = jnp.argmin(dist, axis=1)
        if not bool(jnp.allclose(got[:, perm], ref, atol=1e-5)):
            cache[call.site] = None
        else:
            cache[call.site] = perm
    if cache[call.site] is None:
        return layer_inputs(layer, call)
    return patches(call.lhs)[:, cache[call.site]]


def _stats(layer, call_fp, call_q, groups, key, rows):
    """Per held-out half h: (X_q^T X_q, X_q^T X) per row over the samples of that
    half, at most `rows` random rows per group of samples."""
    side = _act_side(layer, call_fp)
    acc: list[list] = [[0.0, 0.0, 0], [0.0, 0.0, 0]]
    for g, (lo, hi) in enumerate(groups):
        X, Xq = (
            fast_inputs(
                layer, dataclasses.replace(c, **{side: getattr(c, side)[lo:hi]}), _PERMS
            )
            for c in (call_fp, call_q)
        )
        if X is None:
            return None
        if X.shape[0] > rows:
            u = jax.random.uniform(jax.random.fold_in(key, g), (rows,))
            idx = (u * X.shape[0]).astype(jnp.int32)
            X, Xq = X[idx], Xq[idx]
        a = acc[g % 2]
        a[0] = a[0] + np.asarray(Xq.T @ Xq, np.float64)
        a[1] = a[1] + np.asarray(Xq.T @ X, np.float64)
        a[2] += int(X.shape[0])
    return [(np.float32(a[0] / a[2]), np.float32(a[1] / a[2])) for a in acc if a[2]]


def _target(w2d, H, C, percdamp, compensate):
    """W' = W + (H + damp)^-1 (C - H) W: the float output from quantized inputs."""
    if not compensate:
        return jnp.asarray(w2d)
    n = H.shape[0]
    damp = percdamp * np.mean(np.diag(H)) + 1e-12
    corr = np.linalg.solve(H + damp * np.eye(n), (C - H) @ np.asarray(w2d))
    return jnp.asarray(w2d + corr, jnp.float32)


def float_output_error(w2d, v, H, C) -> float:
    """||X W - X_q V||^2 per row, less ||X W||^2 (the same for every V), from the
    half's moments: enough to compare two weights V."""
    w, v = np.asarray(w2d, np.float64), np.asarray(v, np.float64)
    return float(np.sum(v * (H @ v)) - 2 * np.sum(w * (C.T @ v)))


def target_error(wt, v, H) -> float:
    """||X_q (W' - V)||^2 per row: what GPTQ minimises for the target W'."""
    d = np.asarray(v, np.float64) - np.asarray(wt, np.float64)
    return float(np.sum(d * (H @ d)))


def gptq_best_clip(wt, H, clip, bits, percdamp, grid=(1.0,)):
    """GPTQ of the target `wt` [n, C] with, per output channel, the clip ratio
    among `clip` x `grid` (at most 1) of least output error ||X_q (W' - W_q)||:
    GPTQ rounds each output channel on its own, so the choice is per channel."""
    # one program per layer shape (the pass runs under intercept, jit is off)
    with jax.disable_jit(False):
        return _best_clip(
            jnp.asarray(wt, jnp.float32), jnp.asarray(H, jnp.float32),
            jnp.asarray(clip, jnp.float32), jnp.int32(bits),
            percdamp=float(percdamp), grid=tuple(grid),
        )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("percdamp", "grid"))
def _best_clip(wt, H, clip, bits, *, percdamp, grid):
    clips = jnp.stack([jnp.minimum(clip * g, 1.0) for g in grid])
    bits_g = jnp.full((len(grid),), bits)
    wq, new = _gptq_widths(wt, H, clips, bits_g, percdamp=percdamp, act_order=ACT_ORDER)
    d = wq - wt[None]
    err = jnp.sum(d * jnp.einsum("ij,gjc->gic", H, d), axis=1)  # [G, C]
    best = jnp.argmin(err, axis=0)
    pick = lambda a: jnp.take_along_axis(a, best[None, None], axis=0)[0]
    return pick(wq), jnp.take_along_axis(new, best[None], axis=0)[0]


def round_layer(w2d, stats, clip, bits, percdamp, compensate, grid=(1.0,)):
    """(weight [n, C], clip [C], kept RTN?, ||X_q (W' - W_q)|| over RTN's) of one
    layer and width, from the half moments `stats` (one or two halves); `grid`: clip
    multipliers tried per channel (`gptq_best_clip`)."""
    rtn, _ = numerics.fake_quant_weight(
        jnp.asarray(w2d), numerics.WeightQuant(bits, clip)
    )

    def gptq(H, C):
        wt = _target(w2d, H, C, percdamp, compensate)
        return gptq_best_clip(wt, H, clip, bits, percdamp, grid)

    held = stats[-1]
    g0, _ = gptq(*stats[0])
    if len(stats) > 1 and float_output_error(w2d, g0, *held) >= float_output_error(
        w2d, rtn, *held
    ):
        return jnp.asarray(w2d), jnp.asarray(clip), True, None
    H, C = (sum(s[j] for s in stats) / len(stats) for j in range(2))
    wq, new_clip = gptq(H, C)
    wt = _target(w2d, H, C, percdamp, compensate)
    ratio = target_error(wt, wq, H) / max(target_error(wt, rtn, H), 1e-30)
    return wq, new_clip, False, ratio


class _Pass:
    """The op handler of one width's pass: float half as is, quantized half with
    the weights rounded so far; rounds each conv/dense when it is reached."""

    def __init__(self, registry, qparams, k, a_bits, key, rows, n, percdamp, comp,
                 grid, bar):  # fmt: skip
        self.reg, self.qp, self.k, self.n, self.grid = registry, qparams, k, n, grid
        self.bar = bar  # one tick per layer rounded
        self.bits = QuantBits.uniform(registry, qparams.bit_widths[k], a_bits)
        self.key, self.rows, self.percdamp, self.comp = key, rows, percdamp, comp
        self.groups = [(lo, min(lo + HALF_BATCH, n)) for lo in range(0, n, HALF_BATCH)]
        self.weights: dict[int, tuple] = {}  # i -> (w2d [n, C], clip [C])
        self.kept: list[str] = []
        self.ratios: dict[str, float] = {}

    def __call__(self, call):
        i = self.reg.index_of_site(call.site)
        if i is None:
            return call.original()
        layer = self.reg[i]
        call_fp, call_q = _halves(call, layer, self.n)
        left, right = operand_specs(i, self.reg, self.bits, self.qp)
        side = _act_side(layer, call)
        act_q = numerics.fake_quant_activation(getattr(call_q, side), left)[0]
        if layer.kind != "matmul" and i not in self.weights:
            self._round(i, layer, call_fp, dataclasses.replace(call_q, **{side: act_q}))
        if layer.kind != "matmul" and i in self.weights:
            w2d, clip = self.weights[i]
            kern = unweight_2d(w2d, layer.kernel_shape, layer.weight_contracting)
            wside = "lhs" if layer.weight_operand == 0 else "rhs"
            call_q = dataclasses.replace(
                call_q, **{wside: kern.astype(getattr(call_q, wside).dtype)}
            )
            right = numerics.WeightQuant(right.bits, clip)
        # matmuls (attention) in float: see ops.quantized_in_float
        quantize = ops.quantized_in_float if layer.kind == "matmul" else ops.quantized
        out_q = quantize(layer, call_q, left, right)
        out = jnp.concatenate([call_fp.original(), out_q], axis=0)
        assert out.shape[0] == 2 * self.n, (layer.name, out.shape)
        return out

    def _round(self, i, layer, call_fp, call_q):
        key = jax.random.fold_in(self.key, i)
        c = ops.canonical(layer, call_fp)
        w2d = ops.weight_2d(c.right, c.right_contracting).astype(jnp.float32)
        clip = jnp.asarray(self.qp.w_clip[i][self.k])
        self.bar.update(1)
        stats = _stats(layer, call_fp, call_q, self.groups, key, self.rows)
        if stats is None:  # grouped conv, batched weight: the model's weight
            self.weights[i] = (w2d, clip)
            self.kept.append(layer.name)
            return
        bits = self.qp.bit_widths[self.k]
        wq, new_clip, kept, ratio = round_layer(
            w2d, stats, clip, bits, self.percdamp, self.comp, self.grid
        )
        self.weights[i] = (wq, new_clip)
        if kept:
            self.kept.append(layer.name)
        else:
            self.ratios[layer.name] = ratio


@exact_f32
def gptq_seq_qparams(
    model, params: Any, registry: LayerRegistry, qparams: QParams, xs, ts, key, *,
    extra=(), rows=ROWS_PER_BATCH, percdamp=PERCDAMP, compensate=True, grid=(1.0,),
    progress=False,
) -> tuple[QParams, dict]:  # fmt: skip
    """`qparams` (min-MSE: its clip ratios set each width's grid; its activation
    bounds quantize the quantized half) with sequential GPTQ weights for every
    conv/dense layer and width; info as `gptq.gptq_qparams`'s. `compensate`:
    aim at the float output (GPTAQ), else at the layer's own on its quantized
    inputs; `grid`: clip multipliers tried per channel (`gptq_best_clip`)."""
    t0, n, widths = time.perf_counter(), int(xs.shape[0]), qparams.bit_widths
    a_bits = max(widths)
    twice = lambda a: jnp.concatenate([a, a], axis=0)
    passes, layers = [], sum(layer.kind != "matmul" for layer in registry)
    bar = tqdm(total=len(widths) * layers, disable=not progress, unit="layer",
               desc="calibrate: gptq_seq (layer x width)")  # fmt: skip
    for k in range(len(widths)):
        p = _Pass(registry, qparams, k, a_bits, jax.random.fold_in(key, k), rows, n,
                  percdamp, compensate, tuple(grid), bar)  # fmt: skip
        with intercept.intercept(p):
            model.apply({"params": params}, twice(xs), twice(ts), *map(twice, extra))
        passes.append(p)
    bar.close()
    kernels, clips = [], []
    for i, layer in enumerate(registry):
        if layer.kind == "matmul":
            kernels.append(None)
            clips.append(None)
            continue
        kernels.append(_kernels([p.weights[i][0] for p in passes], layer))
        clips.append(jnp.stack([p.weights[i][1] for p in passes]))
    qp = qparams.replace(w_kernel=tuple(kernels), w_clip=tuple(clips))
    info = {
        "gptq_over_rtn": _merge([p.ratios for p in passes]),
        "hessian_layers": len(passes[0].weights),
        "rtn_kept": _kept(passes, widths),
        "compensate": compensate, "activation_bits": a_bits, "clip_grid": list(grid),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    return qp, info


def _merge(ratios) -> dict:
    """{layer: [ratio per width]}, 1.0 where round-to-nearest was kept."""
    names = {n for r in ratios for n in r}
    return {n: [r.get(n, 1.0) for r in ratios] for n in sorted(names)}


def _kept(passes, widths) -> dict:
    out: dict[str, list] = {}
    for p, b in zip(passes, widths, strict=True):
        for name in p.kept:
            out.setdefault(name, []).append(int(b))
    return out
