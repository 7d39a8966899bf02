"""GPTQ (Frantar et al., arXiv 2210.17323): error-feedback rounding of every
conv/dense weight, once per candidate width, stored in `QParams.w_kernel`.

Round-to-nearest (RTN) rounds each weight on its own. GPTQ rounds the input
columns of a weight one after another and spreads each column's rounding error
over the columns not yet rounded, weighted by the layer's input Hessian
H = X^T X, so that the *output* error ||X (W - W_q)|| stays small. A conv is its
im2col matmul: X holds its input patches, in the weight's own row order
(`layer_inputs`).

The column loop is ported from Qwix 0.1.8, `qwix/contrib/gptq_core.py`
(`quantize_weight`); `gptq_core.compute_hessian` and `gptq_core.cholesky_inverse`
take plain arrays and are called as they are. The port differs where the
supernet needs it:
  * the grid is AQT's, the supernet's (`numerics.WeightQuant`): symmetric,
    preserve-zero, +-(2**(b-1)-1) per output channel, scale = channel absmax x
    the min-MSE clip ratio / (2**(b-1) - 0.5); Qwix's `quantize` uses its own
    grid (-2**(b-1) .. 2**(b-1)-1);
  * the width is traced and vmapped: all candidate widths in one program;
  * the columns run in one `lax.fori_loop`, unblocked: Qwix's blocks (its
    `blocksize`) reorder the same arithmetic for memory traffic on accelerators.
The result is stored dequantized (integers x scale) with a clip ratio that makes
the supernet's own quantizer give back exactly those integers, so the supernet,
CONVERT/SERVE and the Qwix export run GPTQ's weights with the stock AQT numerics:
a genome only selects the width's row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from qwix.contrib import gptq_core
from tqdm.auto import tqdm

from tmpq_jax.quant import intercept, numerics, ops
from tmpq_jax.quant.calibration import _batch_size, layer_weights
from tmpq_jax.quant.registry import LayerInfo, LayerRegistry
from tmpq_jax.quant.supernet import QParams

PERCDAMP = 0.01  # Qwix's and the paper's default dampening (of the mean diagonal)
ROWS_PER_BATCH = 8192  # input rows (patches) per layer and batch for the Hessian
ACT_ORDER = True  # inputs of largest Hessian diagonal first


def exact_f32(fn):
    """Run `fn` with true f32 dots. jax's default f32 dot is TF32 on GPUs and one
    bf16 pass on TPUs; GPTQ's Hessians, their inverses and gptaq's X_q^T X -
    X_q^T X_q (a small difference of two large sums) are made in f32 whatever the
    default, as FID's are (`metrics/fid.py`). CPUs compute f32 either way."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------
# The layer's input matrix X (rows: positions; columns: the weight's rows).


def unweight_2d(w2d, kernel_shape, contracting, xp=jnp) -> jax.Array:
    """Inverse of `ops.weight_2d`: [rows, C] back to a kernel of `kernel_shape`
    (its free axes may be given another size C by `w2d`); `xp`: jnp or np."""
    free = [a for a in range(len(kernel_shape)) if a not in contracting]
    lead = [kernel_shape[a] for a in contracting]
    tail = (
        list(jnp.shape(w2d)[1:]) if len(free) == 1 else [kernel_shape[a] for a in free]
    )
    w = xp.reshape(w2d, (*lead, *tail))
    return xp.transpose(w, np.argsort([*contracting, *free]))


def layer_inputs(layer: LayerInfo, call: intercept.OpCall) -> jax.Array | None:
    """X f32[positions, fan_in] with X @ weight_2d(W) == the op's output (per
    channel), or None where GPTQ does not apply (grouped conv, batched weight).
    A conv's patches come from the conv itself with an identity kernel, so
    strides, padding, dilation and layout are the op's own."""
    c = ops.canonical(layer, call)
    kshape, contracting = jnp.shape(c.right), c.right_contracting
    fan_in = math.prod(kshape[a] for a in contracting)
    if call.prim == "conv":
        if call.params.get("feature_group_count", 1) != 1:
            return None
        if call.params.get("batch_group_count", 1) != 1:
            return None
        eye = unweight_2d(jnp.eye(fan_in, dtype=c.left.dtype), kshape, contracting)
        probe = dataclasses.replace(call, rhs=eye)
        out = ops.run_canonical(layer, probe, lax.conv_general_dilated)
        out = jnp.moveaxis(out, c.dimension_numbers.out_spec[1], -1)
        return out.reshape(-1, fan_in).astype(jnp.float32)
    (lc, _), (lb, _) = c.dimension_numbers
    if lb:
        return None
    nd = jnp.ndim(c.left)
    x = jnp.moveaxis(c.left, tuple(lc), tuple(range(nd - len(lc), nd)))
    return x.reshape(-1, fan_in).astype(jnp.float32)


def _hessian_fn(model, registry: LayerRegistry, rows: int):
    """Jitted (variables, x, t, key, *extra) -> {layer: (X^T X, row count)} over
    at most `rows` random rows of X per layer (float model, float inputs)."""

    def fn(variables, x, t, key, *extra):
        got: dict[int, tuple] = {}

        def grab(call):
            i = registry.index_of_site(call.site)
            if i is not None and registry[i].kind != "matmul" and i not in got:
                X = layer_inputs(registry[i], call)
                if X is not None:
                    if X.shape[0] > rows:
                        u = jax.random.uniform(jax.random.fold_in(key, i), (rows,))
                        X = X[(u * X.shape[0]).astype(jnp.int32)]
                    got[i] = (gptq_core.compute_hessian(X.T), X.shape[0])
            return call.original()

        with intercept.intercept(grab):
            model.apply(variables, x, t, *extra)
        return {i: h for i, (h, _) in got.items()}, {i: n for i, (_, n) in got.items()}

    return jax.jit(fn)


def collect_hessians(
    model, variables, registry, xs, ts, key, *, rows=ROWS_PER_BATCH,
    batch_size=64, extra=(), progress=False,
) -> tuple[dict, dict]:  # fmt: skip
    """Two halves of {layer: f32[fan_in, fan_in]} mean X^T X over the calibration
    inputs: even and odd batches. The set is step-major, so the halves hold
    different timesteps: one half checks what was fitted on the other."""
    n = int(xs.shape[0])
    b = _batch_size(n, batch_size)
    fn = _hessian_fn(model, registry, rows)
    sums: list[dict] = [{}, {}]
    count: list[dict] = [{}, {}]
    for s in tqdm(range(n // b), disable=not progress, desc="calibrate: hessians"):
        sl = slice(s * b, (s + 1) * b)
        hs, ns = fn(variables, xs[sl], ts[sl], jax.random.fold_in(key, s),
                    *(e[sl] for e in extra))  # fmt: skip
        for i, h in jax.device_get(hs).items():
            half = s % 2 if n // b > 1 else 0
            sums[half][i] = sums[half].get(i, 0.0) + np.asarray(h, np.float64)
            count[half][i] = count[half].get(i, 0) + int(ns[i])
    mean = lambda j: {
        i: (v / count[j][i]).astype(np.float32) for i, v in sums[j].items()
    }
    return mean(0), (mean(1) if sums[1] else mean(0))


# ----------------------------------------------------------------------------
# The GPTQ column loop on AQT's grid (port of qwix gptq_core.quantize_weight).


def _inverse_hessian_factor(H: jax.Array, percdamp: float):
    """(upper Cholesky factor of H^-1, dead-column mask), as Qwix prepares it:
    dead inputs (zero diagonal) get a unit diagonal, then H is dampened."""
    n = H.shape[0]
    diag = jnp.diag(H)
    dead = diag == 0
    H = jnp.where(dead & jnp.eye(n, dtype=bool), 1.0, H)
    # the barrier keeps XLA from folding percdamp into the mean's 1/n under jit
    # (one ulp off the eager arithmetic, enough to flip a rounding)
    H = H + percdamp * lax.optimization_barrier(jnp.mean(diag)) * jnp.eye(
        n, dtype=H.dtype
    )
    Hinv = gptq_core.cholesky_inverse(jnp.linalg.cholesky(H))
    return jnp.linalg.cholesky(Hinv, upper=True), dead


def _round(w, scale, qmax):
    """AQT's rounding of `w` on the grid `scale` (numerics.TracedIntSymmetric)."""
    q = jnp.clip(w / scale, -qmax, qmax)
    return lax.round(q, lax.RoundingMethod.TO_NEAREST_EVEN)


@jax.jit
def gptq_integers(w: jax.Array, Hinv: jax.Array, dead, scale, bits) -> jax.Array:
    """Integers f32[C, n] for W [C, n] (rows: output channels; columns: inputs)
    given the upper factor `Hinv`, per-channel `scale` [C] and width `bits`."""
    qmax = numerics._pow2(bits - 1) - 1.0
    w = jnp.where(dead[None, :], 0.0, w)

    def column(j, carry):
        w, q = carry
        col = w[:, j]
        qj = _round(col, scale, qmax)
        err = (col - qj * scale) / Hinv[j, j]
        # Hinv is upper triangular: columns < j are untouched, column j is left
        # at its rounded value, the later ones absorb the error.
        w = w - jnp.outer(err, Hinv[j])
        return w, q.at[:, j].set(qj)

    _, q = lax.fori_loop(0, w.shape[1], column, (w, jnp.zeros_like(w)))
    return q


@exact_f32
def gptq_widths(w2d, H, clip, widths, percdamp=PERCDAMP, act_order=ACT_ORDER):
    """For a weight [n, C] (`ops.weight_2d` layout) and its Hessian [n, n]:
    (dequantized GPTQ weights f32[K, n, C], clip ratios f32[K, C] that make the
    supernet's quantizer give back exactly those integers), per width in `widths`
    with the per-channel min-MSE clip ratios `clip` [K, C] setting the grid.
    `act_order`: round the inputs of largest H diagonal first (the GPTQ
    reference's `--act-order`; Qwix 0.1.8 has no such option)."""
    # jit on even inside an intercept (which disables it): run eagerly, the
    # column loop is one dispatch per op and column
    with jax.disable_jit(False):
        return _gptq_widths(
            jnp.asarray(w2d, jnp.float32), jnp.asarray(H, jnp.float32),
            jnp.asarray(clip, jnp.float32), jnp.asarray(widths, jnp.int32),
            percdamp=float(percdamp), act_order=bool(act_order),
        )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("percdamp", "act_order"))
def _gptq_widths(w2d, H, clip, bits, *, percdamp, act_order):
    """`gptq_widths` as one program per layer shape: the widths are vmapped
    (traced bits), so K widths cost one compile, not K."""
    n = H.shape[0]
    perm = jnp.argsort(-jnp.diag(H)) if act_order else jnp.arange(n)
    Hinv, dead = _inverse_hessian_factor(H[perm][:, perm], percdamp)
    inv = jnp.argsort(perm)
    return jax.vmap(lambda c, b: _one_width(w2d, Hinv, dead, perm, inv, c, b))(
        clip, bits
    )


def _one_width(w2d, Hinv, dead, perm, inv, clip, bits):
    """(dequantized weight [n, C], clip [C]) of one width (see `gptq_widths`)."""
    _, scale = numerics.fake_quant_weight(w2d, numerics.WeightQuant(bits, clip))
    scale = jnp.ravel(scale)
    q = gptq_integers(w2d[perm].T, Hinv, dead, scale, bits).T[inv]
    wq = q * scale
    absmax = jnp.max(jnp.abs(wq), axis=0)
    # the supernet's scale is absmax(W) x clip / (2**(b-1) - 0.5): pick the
    # clip that brings it back to GPTQ's scale (absmax 0 counts as 1 there)
    qb = numerics._pow2(bits - 1) - 0.5
    return wq, scale * qb / jnp.where(absmax == 0, 1.0, absmax)


def output_error(w2d, wq2d, H) -> float:
    """tr((W - W_q)^T H (W - W_q)): the mean squared output error on the inputs
    H was made from (the quantity GPTQ minimises)."""
    return float(
        _output_error(
            jnp.asarray(w2d, jnp.float32),
            jnp.asarray(wq2d, jnp.float32),
            jnp.asarray(H),
        )
    )


# ----------------------------------------------------------------------------
# The whole model.


@exact_f32
def gptq_qparams(
    model, params: Any, registry: LayerRegistry, qparams: QParams, xs, ts, key, *,
    extra=(), rows=ROWS_PER_BATCH, percdamp=PERCDAMP, batch_size=64, progress=False,
) -> tuple[QParams, dict]:  # fmt: skip
    """`qparams` (min-MSE: its clip ratios set each width's grid) with GPTQ
    weights for every conv/dense layer and width (`w_kernel`) and the clip
    ratios that keep them on their grid; info: per layer and width GPTQ's output
    error over RTN's on the calibration inputs, and where RTN was kept."""
    halves = collect_hessians(model, {"params": params}, registry, xs, ts, key,
                              rows=rows, batch_size=batch_size, extra=extra,
                              progress=progress)  # fmt: skip
    first = (xs[:1], ts[:1], *(e[:1] for e in extra))
    weights = layer_weights(model, {"params": params}, registry, *first)
    kernels, clips, ratios, kept = [], [], {}, {}
    bar = tqdm(registry, disable=not progress, desc="calibrate: gptq", unit="layer")
    for i, layer in enumerate(bar):
        if layer.kind == "matmul":
            kernels.append(None)
            clips.append(None)
            continue
        w2d, clip = weights[i], np.asarray(qparams.w_clip[i])
        hs = [h.get(i) for h in halves]
        wq, new_clip, rtn, r = _layer(w2d, hs, clip, qparams.bit_widths, percdamp)
        kernels.append(_kernels(wq, layer))
        clips.append(jnp.asarray(new_clip))
        if r is not None:
            ratios[layer.name] = r
        if rtn:
            kept[layer.name] = rtn
    qp = qparams.replace(w_kernel=tuple(kernels), w_clip=tuple(clips))
    layers = sum(h is not None for h in halves[0].values())
    return qp, {"gptq_over_rtn": ratios, "hessian_layers": layers, "rtn_kept": kept}


def _layer(w2d, hs, clip, widths, percdamp):
    """(f32[K, n, C] weights, f32[K, C] clips, widths kept at RTN, per width GPTQ's
    output error over RTN's on both halves or None) of one layer. A width keeps
    round-to-nearest (the model's weight, min-MSE clip) where GPTQ fitted on one
    half of the Hessian rows does worse than RTN on the other half (e.g. the time
    embedding, seen at few timesteps); else GPTQ on all."""
    k = len(widths)
    w = np.broadcast_to(np.asarray(w2d, np.float32), (k, *np.shape(w2d)))
    if hs[0] is None:  # GPTQ does not apply: the model's weight at every width
        return w, np.asarray(clip), list(widths), None
    held, wq, new_clip, full = jax.device_get(
        _layer_fit(w2d, hs[0], hs[1], clip, np.asarray(widths, np.int32),
                   percdamp=float(percdamp))
    )  # fmt: skip
    ratio = lambda e: [float(g) / max(float(r), 1e-30) for g, r in zip(*e, strict=True)]
    use = np.asarray([r < 1.0 for r in ratio(held)])
    wq = np.where(use[:, None, None], wq, w)
    new_clip = np.where(use[:, None], new_clip, np.asarray(clip))
    # a kept width is the model's weight: no output error of its own
    ratios = [r if u else 0.0 for r, u in zip(ratio(full), use, strict=True)]
    return (
        wq,
        new_clip,
        [int(b) for b, u in zip(widths, use, strict=True) if not u],
        ratios,
    )


@functools.partial(jax.jit, static_argnames=("percdamp",))
def _layer_fit(w2d, h_fit, h_held, clip, bits, *, percdamp):
    """One program per layer shape: ((GPTQ's, RTN's) output error on `h_held` of
    GPTQ fitted on `h_fit`), GPTQ on both halves (weights, clips) and its
    (GPTQ's, RTN's) output error there; per width."""
    fit = lambda H: _gptq_widths(w2d, H, clip, bits, percdamp=percdamp,
                                 act_order=ACT_ORDER)  # fmt: skip
    rtn = jax.vmap(lambda c, b: numerics.fake_quant_weight(
        w2d, numerics.WeightQuant(b, c))[0])(clip, bits)  # fmt: skip
    err = lambda wq, H: jax.vmap(lambda v: _output_error(w2d, v, H))(wq)
    H = (h_fit + h_held) / 2
    wq, new_clip = fit(H)
    held = (err(fit(h_fit)[0], h_held), err(rtn, h_held))
    return held, wq, new_clip, (err(wq, H), err(rtn, H))


def _output_error(w2d, wq2d, H):
    """`output_error` as a traced scalar (jittable, vmappable)."""
    d = wq2d - w2d
    return jnp.sum(d * (H @ d))


def _kernels(w2d_k, layer: LayerInfo) -> jax.Array:
    """f32[K, *kernel_shape] from per-width [K, n, C] weights (numpy: no eager
    op, hence no compile, per layer shape)."""
    un = lambda w: unweight_2d(w, layer.kernel_shape, layer.weight_contracting, np)
    return jnp.asarray(np.stack([un(np.asarray(w)) for w in w2d_k]), jnp.float32)
