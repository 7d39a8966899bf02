"""Integer fake-quant with *traced* bit-widths, on top of AQT (the only AQT importer).

TMPQ-DM (arXiv 2404.09532) searches per-layer bit-widths; to evaluate a whole
population of genomes in one compiled program, the bit-width must be an array, not
a Python int. AQT (`aqtp==0.9.0`, `aqt.jax.v2`) keeps `bits` in its numerics object,
which its configs treat as static. `TracedIntSymmetric` is a small subclass of AQT's
`IntSymmetric` whose clip bound is computed from a possibly traced `bits`; the
integer container is always int8 (never int4: int4 dots are ~1000x slower on GPU),
which holds every width in 2..8.

Granularity, as in TMPQ-DM: activations per-tensor (a static calibrated |x| bound,
or dynamic absmax when none is given), weights symmetric per output channel (absmax,
optionally scaled by a calibrated per-channel clip ratio). Calibration objects are
AQT `Calibration` subclasses, so stored results are only *selected*, never recomputed.

The ops below call AQT's functional entry points (`DotGeneral`, the conv replacement
from `aqt_conv_general`, `aqt_dot_general.einsum`) rather than its Flax wrapper
modules: nothing is created inside the intercepted layer, and the custom VJP (which
would flatten a config holding tracers) is off. This is forward-only: AQT's conv is
fake-quant without a straight-through gradient, and with the custom VJP off the dot
has none either. AQT configs are mutated on first use (`init_calibration`), so every
call builds a fresh one. Keep AQT behind this module so a swap (e.g. to Qwix) stays
local.

CONVERT/SERVE (real int8 weights, `export.py`): `convert_weight` is AQT's CONVERT
for one kernel (the rhs `QTensor` its quantizer computes: int8 qvalue + per-channel
scale); `served_dot_general` / `served_conv_general_dilated` are AQT's SERVE: the
frozen `QTensor` is handed to AQT's dot_general / conv as `rhs_qt`, which replaces
the kernel's quantization, exactly what AQT's Flax `Freezer` does in SERVE mode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from aqt.jax.v2 import (
    aqt_conv_general,
    aqt_dot_general,
    aqt_quantizer,
    aqt_tensor,
    calibration,
)
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2 import utils as aqt_utils
from aqt.jax.v2.numerics import int_numerics
from jax import lax

MIN_BITS, MAX_BITS = 2, 8  # what an int8 container with symmetric rounding holds


def _pow2(e):
    """2.0**e, exact for a traced integer exponent (float pow need not be exact)."""
    if isinstance(e, int):
        return 2.0**e
    one = jnp.ones(jnp.shape(e), jnp.int32)
    return lax.shift_left(one, jnp.asarray(e, jnp.int32)).astype(jnp.float32)


@aqt_utils.flax_slots_kw_only_dataclass
class TracedIntSymmetric(int_numerics.IntSymmetric):
    """AQT `IntSymmetric` (preserve_zero, round-to-nearest-even) with traced `bits`.

    Same buckets as the stock class: values are scaled so that absmax maps to
    2**(bits-1) - 0.5 and clipped to +-(2**(bits-1) - 1). The parent's
    `assert bits <= 22` cannot run on a tracer, hence the override.
    """

    def get_edge_of_last_int_bucket(self):
        return _pow2(self.bits - 1) - 0.5  # preserve_zero loses one bucket

    def vjp_fwd(self, x, context):
        del context  # no stochastic rounding
        bound = self._get_fwd_clip_bound()
        q = lax.round(jnp.clip(x, -bound, bound), lax.RoundingMethod.TO_NEAREST_EVEN)
        return q.astype(self.dtype), (x,)


def int_numerics_for(bits) -> TracedIntSymmetric:
    """Numerics for `bits` (a Python int or a traced int32 scalar), int8 container."""
    return TracedIntSymmetric(
        bits=bits,
        preserve_zero=True,
        preserve_max_val=False,
        clip=True,
        clip_gradient=False,
        round=True,
        noise_fn=None,
        dtype=jnp.int8,
    )


@aqt_utils.flax_slots_kw_only_dataclass
class PerTensorCalibration(calibration.Calibration):
    """One scale for the whole tensor: bound / quant_bound.

    `bound` is a static (calibrated) |x| range, a scalar that may be traced; `None`
    means dynamic absmax of the tensor itself (AQT's `AbsMaxCalibration` arithmetic
    over all axes). AQT's `shared_axes` are ignored on purpose: its conv path pins
    activations to per-example scales.
    """

    bound: jax.Array | float | None = None

    def get_scale_and_bias_and_sparsity(self, x, shared_axes, numerics_, context=None):
        del shared_axes, context
        dtype = self.dtype if self.dtype is not None else x.dtype
        if self.bound is None:
            bound = jnp.max(jnp.abs(x), keepdims=True)
        else:
            bound = jnp.broadcast_to(jnp.asarray(self.bound), (1,) * x.ndim)
        bound = jnp.where(bound == 0.0, jnp.ones_like(bound), bound)
        scale = bound / numerics_.get_quant_bound()
        return [scale.astype(dtype)], [], None


@aqt_utils.flax_slots_kw_only_dataclass
class ChannelCalibration(calibration.Calibration):
    """AQT's absmax over `shared_axes` (per output channel for weights), times an
    optional calibrated per-channel clip ratio `clip_ratio` ([C_out], may be traced)."""

    clip_ratio: jax.Array | None = None

    def get_scale_and_bias_and_sparsity(self, x, shared_axes, numerics_, context=None):
        del context
        dtype = self.dtype if self.dtype is not None else x.dtype
        abs_max = jnp.max(jnp.abs(x), axis=shared_axes, keepdims=True)
        abs_max = jnp.where(abs_max == 0.0, jnp.ones_like(abs_max), abs_max)
        if self.clip_ratio is not None:
            abs_max = abs_max * jnp.reshape(self.clip_ratio, abs_max.shape)
        scale = abs_max / numerics_.get_quant_bound()
        return [scale.astype(dtype)], [], None


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How to quantize an activation: `bits` (int or traced), per-tensor; `bound`:
    static |x| range (scalar, may be traced) or None for dynamic absmax."""

    bits: int | jax.Array
    bound: jax.Array | float | None = None


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How to quantize a weight: `bits`, per output channel (the last kernel axis);
    `clip_ratio`: optional [C_out] ratio to the channel absmax."""

    bits: int | jax.Array
    clip_ratio: jax.Array | None = None


def _set(q: aqt_quantizer.Quantizer, spec: ActQuant | WeightQuant) -> None:
    q.numerics = int_numerics_for(spec.bits)
    if isinstance(spec, ActQuant):
        q.calibration = functools.partial(PerTensorCalibration, bound=spec.bound)
    else:
        q.calibration = functools.partial(
            ChannelCalibration, clip_ratio=spec.clip_ratio
        )


def dot_general_config(lhs: ActQuant | WeightQuant, rhs: ActQuant | WeightQuant):
    """A forward-only AQT `DotGeneral` (`config_v4` base, int8 x int8 -> int32).

    Single use: AQT initialises its calibrators in place on the first call.
    """
    cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
    _set(cfg.fwd.dg_quantizer.lhs, lhs)
    _set(cfg.fwd.dg_quantizer.rhs, rhs)
    cfg.fwd.dg_accumulator_dtype = jnp.int32
    cfg.apply_custom_vjp_on_jax = False
    return cfg


def conv_config(lhs: ActQuant, rhs: WeightQuant, spatial_dims: int):
    """AQT's conv `DotGeneralRaw` (Flax NHWC/HWIO layout) with our numerics."""
    raw = aqt_config.conv_general_dilated_make(
        spatial_dims, lhs_bits=8, rhs_bits=8, initialize_calibration=False
    )
    _set(raw.dg_quantizer.lhs, lhs)
    _set(raw.dg_quantizer.rhs, rhs)
    raw.dg_quantizer.lhs.init_calibration()
    raw.dg_quantizer.rhs.init_calibration()
    return raw


def dot_general(act: ActQuant, weight: WeightQuant):
    """A `lax.dot_general` replacement for `nn.Dense(dot_general=...)`."""

    def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type  # int8 dot, float output
        return dot_general_config(act, weight)(lhs, rhs, dimension_numbers)

    return fn


def conv_general_dilated(act: ActQuant, weight: WeightQuant):
    """A `lax.conv_general_dilated` replacement for `nn.Conv(conv_general_dilated=...)`."""

    def fn(lhs, rhs, *args, **kwargs):
        raw = conv_config(act, weight, rhs.ndim - 2)
        return aqt_conv_general.make_conv_general_dilated(raw)(
            lhs, rhs, *args, **kwargs
        )

    return fn


def _einsum_swaps(equation: str, a: jax.Array, b: jax.Array) -> bool:
    """Whether `jnp.einsum` hands (b, a) rather than (a, b) to dot_general (as
    AQT's `AqtEinsum` finds out): the operands' quantizers must follow them."""
    spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)
    fn = functools.partial(aqt_dot_general.einsum, equation)
    jaxpr = jax.make_jaxpr(fn)(spec(a), spec(b))
    ins = jaxpr.jaxpr.invars
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    if len(dots) != 1 or set(map(id, dots[0].invars)) != set(map(id, ins)):
        raise NotImplementedError(
            f"einsum {equation!r} is not a single dot_general of its two inputs"
        )
    return dots[0].invars[0] is ins[1]


def einsum(equation: str, a: jax.Array, b: jax.Array, a_q: ActQuant, b_q: ActQuant):
    """Two-operand einsum with both operands quantized per-tensor (AQT dot_general)."""
    dtype = jnp.result_type(a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    if _einsum_swaps(equation, a, b):
        cfg = dot_general_config(b_q, a_q)
    else:
        cfg = dot_general_config(a_q, b_q)
    return aqt_dot_general.einsum(equation, a, b, dg=cfg)


def _quant(x, spec, shared_axes: Sequence[int] | None) -> aqt_tensor.QTensor:
    q = aqt_quantizer.quantizer_make(8, initialize_calibration=False)
    _set(q, spec)
    q.init_calibration()
    qt, _ = q.quant(x, calibration_axes=shared_axes)
    return qt


def _fake_quant(x, spec, shared_axes: Sequence[int] | None):
    qt = _quant(x, spec, shared_axes)
    return qt.dequant(), qt.scale[0]


def fake_quant_weight(w: jax.Array, spec: WeightQuant) -> tuple[jax.Array, jax.Array]:
    """(dequantized weight, per-channel scale) for a kernel whose last axis is the
    output channel, exactly as the ops above quantize it. For calibration and tests."""
    return _fake_quant(w, spec, list(range(w.ndim - 1)))


def fake_quant_activation(x: jax.Array, spec: ActQuant) -> tuple[jax.Array, jax.Array]:
    """(dequantized activation, per-tensor scale), exactly as the ops quantize it."""
    return _fake_quant(x, spec, None)


# ----------------------------------------------------------------------------
# CONVERT / SERVE: frozen int8 kernels.


def convert_weight(
    w: jax.Array, spec: WeightQuant, contracting: Sequence[int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """AQT CONVERT of one kernel (per channel over the axes not in `contracting`;
    default: all but the last), quantized exactly as the ops above quantize it:
    (qvalue int8[w.shape] in +-(2**(bits-1)-1), scale float32[C] flat)."""
    axes = list(range(w.ndim - 1)) if contracting is None else list(contracting)
    qt = _quant(w, spec, axes)
    return qt.qvalue, jnp.ravel(qt.scale[0])


def _frozen(
    qvalue: jax.Array, scale: jax.Array, contracting: Sequence[int] | None = None
) -> aqt_tensor.QTensor:
    """A full AQT `QTensor` of a frozen kernel, as AQT's Freezer returns in SERVE."""
    axes = range(qvalue.ndim - 1) if contracting is None else contracting
    shape = tuple(1 if i in axes else d for i, d in enumerate(qvalue.shape))
    return aqt_tensor.QTensor(
        qvalue=qvalue,
        scale=[jnp.reshape(scale, shape)],
        scale_t=None,
        bias=[],
        dequant_dtype=scale.dtype,
    )


_UNUSED = WeightQuant(MAX_BITS)  # rhs numerics of a SERVE op: the frozen QTensor wins


def served_dot_general(
    act: ActQuant, qvalue: jax.Array, scale: jax.Array, contracting=None
):
    """AQT SERVE: a `lax.dot_general` replacement whose right operand is the frozen
    (qvalue, scale); the `rhs` it is called with is ignored."""

    def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type
        cfg = dot_general_config(act, _UNUSED)
        frozen = _frozen(qvalue, scale, contracting)
        out, _ = cfg.dg_core(lhs, rhs, None, frozen, dimension_numbers)
        return out

    return fn


def served_conv_general_dilated(
    act: ActQuant, qvalue: jax.Array, scale: jax.Array, conv_dtype=None
):
    """AQT SERVE: a `lax.conv_general_dilated` replacement for `nn.Conv` whose kernel
    is the frozen (qvalue, scale); the `rhs` it is called with is ignored.

    `conv_dtype` (bfloat16 or int8): run the convolution itself on the integer
    values in that dtype (`_integer_conv`); None: AQT's own op."""
    if conv_dtype is not None:
        return _integer_conv(act, qvalue, scale, conv_dtype)

    def fn(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
    ):
        raw = conv_config(act, _UNUSED, rhs.ndim - 2)
        conv = aqt_conv_general.make_conv_general_dilated_with_qt(raw)
        out, _ = conv(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_qt=None,
            rhs_qt=_frozen(qvalue, scale),
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        return out

    return fn


def _integer_conv(act: ActQuant, qvalue: jax.Array, scale: jax.Array, conv_dtype):
    """SERVE conv with both operands' integer values (|q| <= 127) in `conv_dtype`.
    int8: summed in int32, handed out as float32 (cuDNN's int8 convolutions give s8
    or f32, never s32: asking for int32 made XLA fall back to float kernels).
    bfloat16: exact (8 significant bits), products exact and summed in float32.
    Either way the output equals AQT's float32 conv of the same integers wherever
    the partial sums stay below 2**24 (in practice everywhere). Scales are applied
    afterwards in AQT's order (activation scale, then kernel)."""

    def fn(lhs, rhs, window_strides, padding, **conv_kwargs):
        del rhs  # the frozen kernel replaces it
        conv_kwargs.pop("precision", None)
        conv_kwargs["preferred_element_type"] = jnp.float32
        lhs_qt = _quant(lhs, act, None)
        out = lax.conv_general_dilated(
            lhs_qt.qvalue.astype(conv_dtype),
            qvalue.astype(conv_dtype),
            window_strides,
            padding,
            **conv_kwargs,
        )
        out = out.astype(jnp.float32) * lhs_qt.scale[0]
        shape = (1,) * (out.ndim - 1) + (scale.shape[-1],)
        return (out * jnp.reshape(scale, shape)).astype(lhs.dtype)

    return fn
