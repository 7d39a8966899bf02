"""The quantization supernet: any Flax model, run with per-op traced bits.

TMPQ-DM (arXiv 2404.09532) evaluates many layer-wise precision genomes on one
pretrained network. Here no model is edited: `quantized_apply` runs `model.apply`
with every matmul and convolution intercepted (`intercept.py`), and each one the
`LayerRegistry` lists is rerun through AQT (`numerics.py`, via `ops.py`) with its
bits, looked up by its site (module path and op index).

Genes (`QuantBits`, int32[L] each; layer i = registry index i):
  * conv/dense: `a_bits[i]` quantizes the input activation (per-tensor),
    `w_bits[i]` the weight (symmetric, per output channel);
  * matmul (both operands activations): `a_bits[i]` is the left operand (q of
    q.k), `w_bits[i]` the right one (k of q.k, v of p.v), each per tensor. A
    softmax output is the left operand, pinned at 8 bits: its `a_bits` gene is
    inert. This gives exactly the paper's q, k, v genes per attention.

The bits are ordinary arrays closed over by the handler, so under `jax.vmap`
over a population they are batched tracers and one compiled program serves every
genome. Calibrated results (`QParams`) are stored for every bit-width and only
*selected* (`jnp.take` by the width's index); without them activation scales are
dynamic absmax and weight scales plain per-channel absmax. Forward only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tmpq_jax.errors import UserError
from tmpq_jax.quant import intercept, numerics, ops
from tmpq_jax.quant.registry import LayerRegistry

DEFAULT_CANDIDATES = (8, 7, 6, 5)


@struct.dataclass
class QuantBits:
    """Per-layer bit-widths: int32[L] each (or [P, L] for a population)."""

    w_bits: jax.Array  # kernel bits; right-operand bits for a MatMul
    a_bits: jax.Array  # input-activation bits; left-operand bits for a MatMul

    @classmethod
    def uniform(cls, registry: LayerRegistry, w_bits: int, a_bits: int) -> QuantBits:
        """Uniform WxAy: MatMul operands are activations, so both get `a_bits`."""
        is_mm = np.array([k == "matmul" for k in registry.kinds])
        w = np.where(is_mm, a_bits, w_bits).astype(np.int32)
        return cls(jnp.asarray(w), jnp.full((len(registry),), a_bits, jnp.int32))

    @classmethod
    def from_names(
        cls,
        registry: LayerRegistry,
        layers: Mapping[str, tuple[int, int]],
        default: tuple[int, int] = (8, 8),
    ) -> QuantBits:
        """`default` (w, a) everywhere, `layers[name] = (w, a)` where given."""
        w = np.full(len(registry), default[0], np.int32)
        a = np.full(len(registry), default[1], np.int32)
        for name, (wb, ab) in layers.items():
            i = registry.index(name)
            w[i], a[i] = wb, ab
        return cls(jnp.asarray(w), jnp.asarray(a))


@struct.dataclass
class QParams:
    """Calibrated quantization results for every layer at every width in `bit_widths`.

    act_bound: float32[L, 2, K] static per-tensor |x| bound of the layer's left
        operand (0: conv/dense input, q, softmax output) and right MatMul operand (1)
        at width `bit_widths[k]`; None: dynamic absmax everywhere.
    w_clip: per layer float32[K, C_out] clip ratio to the channel absmax (None for
        MatMul layers); None: no clipping.
    bias_corr: per layer float32[K, K, C_out], the mean output error of the
        conv/dense at (w_bits, a_bits) = (bit_widths[k], bit_widths[j]) over the
        calibration set (`bias_correction.py`), subtracted from its output
        (None for MatMul layers); None: no correction.
    w_kernel: per layer float32[K, *kernel_shape], the weight to quantize at width
        `bit_widths[k]` in place of the model's own (a PTQ method's rounding,
        e.g. GPTQ's, `gptq.py`: already on that width's grid under `w_clip`), None
        for MatMul layers; None: the model's weights.
    `bit_widths` must hold every genome candidate and the pinned softmax width.
    """

    bit_widths: tuple[int, ...] = struct.field(pytree_node=False)
    act_bound: jax.Array | None = None
    w_clip: tuple[jax.Array | None, ...] | None = None
    bias_corr: tuple[jax.Array | None, ...] | None = None
    w_kernel: tuple[jax.Array | None, ...] | None = None

    def width_index(self, bits) -> Any:
        """Index of `bits` in `bit_widths` (static for an int, traced otherwise)."""
        if isinstance(bits, int):
            return self.bit_widths.index(bits)
        return jnp.argmax(jnp.asarray(self.bit_widths, jnp.int32) == bits)


# ----------------------------------------------------------------------------
# Boundary validation (outside jit): one-line UserErrors, never silent clipping.


def check_candidates(candidates: Sequence[int]) -> tuple[int, ...]:
    cands = tuple(int(c) for c in candidates)
    bad = [c for c in cands if not numerics.MIN_BITS <= c <= numerics.MAX_BITS]
    if not cands or bad or len(set(cands)) != len(cands):
        raise UserError(
            f"candidate bit-widths {list(candidates)}: give distinct widths in "
            f"{numerics.MIN_BITS}..{numerics.MAX_BITS} (an int8 container holds them)."
        )
    return cands


def _concrete(x) -> np.ndarray | None:
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_bits(
    bits: QuantBits,
    registry: LayerRegistry,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    population: bool = False,
) -> None:
    """Shapes always (also under jit); values wherever they are concrete.
    `population`: bits are [P, L] (else [L]; vmap over a population)."""
    cands = check_candidates(candidates)
    n = len(registry)
    for field in ("w_bits", "a_bits"):
        v = getattr(bits, field)
        shape = jnp.shape(v)
        if len(shape) != 1 + population or shape[-1] != n:
            want = (
                f"[population, {n}]"
                if population
                else f"[{n}] (vmap over a population)"
            )
            raise UserError(
                f"{field} has shape {shape} but the model has {n} quantizable layers; "
                f"give an int array of shape {want}."
            )
        if not jnp.issubdtype(jnp.result_type(v), jnp.integer):
            raise UserError(f"{field} must be integers, got {jnp.result_type(v)}.")
        arr = _concrete(v)
        if arr is not None and not np.isin(arr, cands).all():
            bad = sorted(set(np.unique(arr).tolist()) - set(cands))
            raise UserError(
                f"{field} holds bit-widths {bad} outside the candidate set {list(cands)}."
            )


def check_qparams(
    qparams: QParams, registry: LayerRegistry, candidates: Sequence[int]
) -> None:
    n, k = len(registry), len(qparams.bit_widths)
    needed = set(candidates) | {b for b in registry.pinned_lhs_bits.tolist() if b}
    missing = sorted(needed - set(qparams.bit_widths))
    if missing:
        raise UserError(
            f"calibration covers bit-widths {list(qparams.bit_widths)} but not "
            f"{missing}; calibrate those widths too."
        )
    if qparams.act_bound is not None and jnp.shape(qparams.act_bound) != (n, 2, k):
        raise UserError(
            f"act_bound has shape {jnp.shape(qparams.act_bound)}, expected {(n, 2, k)}."
        )
    if qparams.w_clip is not None:
        if len(qparams.w_clip) != n:
            raise UserError(f"w_clip has {len(qparams.w_clip)} entries, expected {n}.")
        for layer, clip in zip(registry, qparams.w_clip, strict=True):
            want = (k, layer.channels) if layer.kernel_shape else None
            if (clip is None) != (want is None) or (
                clip is not None and jnp.shape(clip) != want
            ):
                raise UserError(
                    f"w_clip for {layer.name!r}: shape {jnp.shape(clip)}, expected {want}."
                )
    if qparams.bias_corr is not None:
        if len(qparams.bias_corr) != n:
            raise UserError(
                f"bias_corr has {len(qparams.bias_corr)} entries, expected {n}."
            )
        for layer, corr in zip(registry, qparams.bias_corr, strict=True):
            want = (k, k, layer.channels) if layer.kernel_shape else None
            if (corr is None) != (want is None) or (
                corr is not None and jnp.shape(corr) != want
            ):
                raise UserError(
                    f"bias_corr for {layer.name!r}: shape {jnp.shape(corr)}, "
                    f"expected {want}."
                )
    if qparams.w_kernel is not None:
        if len(qparams.w_kernel) != n:
            raise UserError(
                f"w_kernel has {len(qparams.w_kernel)} entries, expected {n}."
            )
        for layer, kern in zip(registry, qparams.w_kernel, strict=True):
            want = (k, *layer.kernel_shape) if layer.kernel_shape else None
            if (kern is None) != (want is None) or (
                kern is not None and jnp.shape(kern) != want
            ):
                raise UserError(
                    f"w_kernel for {layer.name!r}: shape {jnp.shape(kern)}, "
                    f"expected {want}."
                )


# ----------------------------------------------------------------------------
# The one selection of calibrated results, and the op handler.


def operand_specs(
    i: int,
    registry: LayerRegistry,
    bits: QuantBits,
    qparams: QParams | None,
    act_bound: jax.Array | None = None,
):
    """(left, right) quantization specs of layer i at `bits`, with the calibrated
    results selected at its widths: from `qparams`, or from `act_bound` f32[L, 2]
    already selected (a frozen genome). The right spec is a `WeightQuant` for a
    conv/dense, an `ActQuant` for a matmul."""
    layer = registry[i]
    left_bits = layer.pinned_lhs_bits or bits.a_bits[i]
    right_bits = bits.w_bits[i]
    left_bound = right_bound = clip = None
    if act_bound is not None:
        left_bound, right_bound = act_bound[i, 0], act_bound[i, 1]
    elif qparams is not None and qparams.act_bound is not None:
        row = qparams.act_bound[i]
        left_bound = jnp.take(row[0], qparams.width_index(left_bits))
        if layer.kind == "matmul":
            right_bound = jnp.take(row[1], qparams.width_index(right_bits))
    if qparams is not None and qparams.w_clip is not None and layer.kind != "matmul":
        clip = jnp.take(qparams.w_clip[i], qparams.width_index(right_bits), axis=0)
    left = numerics.ActQuant(left_bits, left_bound)
    if layer.kind == "matmul":
        return left, numerics.ActQuant(right_bits, right_bound)
    return left, numerics.WeightQuant(right_bits, clip)


def bias_corr_at(i: int, bits: QuantBits, qparams: QParams | None):
    """f32[C_out]: layer i's stored output correction at its (w, a) widths, or None."""
    if qparams is None or qparams.bias_corr is None or qparams.bias_corr[i] is None:
        return None
    corr = jnp.take(qparams.bias_corr[i], qparams.width_index(bits.w_bits[i]), axis=0)
    return jnp.take(corr, qparams.width_index(bits.a_bits[i]), axis=0)


def kernel_at(i: int, bits: QuantBits, qparams: QParams | None):
    """Layer i's stored weight at its w_bits width (`QParams.w_kernel`, selected by
    the traced bits), or None: the model's own weight."""
    if qparams is None or qparams.w_kernel is None or qparams.w_kernel[i] is None:
        return None
    return jnp.take(qparams.w_kernel[i], qparams.width_index(bits.w_bits[i]), axis=0)


def with_kernel(i: int, registry: LayerRegistry, call, bits, qparams):
    """`call` with its weight operand (the registry's `weight_operand`) replaced
    by `kernel_at`, if one is stored."""
    kern = kernel_at(i, bits, qparams)
    if kern is None:
        return call
    side = "lhs" if registry[i].weight_operand == 0 else "rhs"
    old = getattr(call, side)
    return dataclasses.replace(call, **{side: kern.astype(old.dtype)})


def make_handler(bits: QuantBits, registry: LayerRegistry, qparams: QParams | None = None):
    """An op handler (`intercept.intercept`) quantizing every registered op with
    `bits`; ops the registry keeps in float run as they are."""

    def handler(call: intercept.OpCall):
        i = registry.index_of_site(call.site)
        if i is None:
            return call.original()
        left, right = operand_specs(i, registry, bits, qparams)
        corr = bias_corr_at(i, bits, qparams)
        call = with_kernel(i, registry, call, bits, qparams)
        return ops.quantized(registry[i], call, left, right, corr)

    return handler


def quantized_apply(
    model: Any,
    variables: Any,
    *args,
    bits: QuantBits,
    registry: LayerRegistry,
    qparams: QParams | None = None,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    **apply_kwargs,
):
    """`model.apply(variables, *args, **apply_kwargs)` with every registered layer
    quantized at `bits` (int32[L] per field; traced, vmappable). Bits are checked
    against `candidates` where concrete; shapes are always checked."""
    check_bits(bits, registry, candidates)
    if qparams is not None:
        check_qparams(qparams, registry, candidates)
    with intercept.intercept(make_handler(bits, registry, qparams)):
        return model.apply(variables, *args, **apply_kwargs)
