"""One intercepted op in canonical form, run in float, fake-quant or served int8.

Every registered op is brought to one form: `left @ right`, where `left` is the
activation (or a softmax output) and `right` the weight (or the other
activation). A dot_general whose weight is its left operand, or an attention
matmul whose softmax is its right one, is run with its operands swapped and its
output transposed back; per-tensor and per-channel quantization do not care.
In canonical form a weight's output channels are the output's trailing axes,
where a bias correction is subtracted. The supernet, calibration, bias
correction, reconstruction and SERVE all go through here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tmpq_jax.quant import numerics
from tmpq_jax.quant.intercept import OpCall
from tmpq_jax.quant.registry import LayerInfo

_CONV_KEYS = (
    "window_strides",
    "padding",
    "lhs_dilation",
    "rhs_dilation",
    "dimension_numbers",
    "feature_group_count",
    "batch_group_count",
    "precision",
    "preferred_element_type",
)


@dataclasses.dataclass(frozen=True)
class Canonical:
    """`left @ right` of one call: operands, dimension numbers, and the output
    permutation that gives back the primitive's layout (None: identity)."""

    left: Any
    right: Any
    dimension_numbers: Any
    out_perm: tuple[int, ...] | None
    right_contracting: tuple[int, ...]


def canonical(layer: LayerInfo, call: OpCall) -> Canonical:
    if call.prim == "conv":
        dn = call.params["dimension_numbers"]
        axes = tuple(i for i in range(jnp.ndim(call.rhs)) if i != dn.rhs_spec[0])
        return Canonical(call.lhs, call.rhs, dn, None, axes)
    (lc, rc), (lb, rb) = call.params["dimension_numbers"]
    flip = layer.weight_operand == 0 or layer.swap
    if not flip:
        return Canonical(call.lhs, call.rhs, ((lc, rc), (lb, rb)), None, tuple(rc))
    nb = len(lb)
    n_left_free = jnp.ndim(call.lhs) - len(lc) - nb
    n_right_free = jnp.ndim(call.rhs) - len(rc) - nb
    perm = (
        tuple(range(nb))
        + tuple(nb + n_right_free + k for k in range(n_left_free))
        + tuple(nb + k for k in range(n_right_free))
    )
    return Canonical(call.rhs, call.lhs, ((rc, lc), (rb, lb)), perm, tuple(lc))


def _finish(c: Canonical, out, call: OpCall, corr=None):
    if corr is not None:
        free = [
            d for i, d in enumerate(jnp.shape(c.right)) if i not in c.right_contracting
        ]
        out = out - jnp.reshape(corr, free).astype(out.dtype)
    if c.out_perm is not None:
        out = jnp.transpose(out, c.out_perm)
    return out.astype(call.out_dtype)


def _conv_kwargs(call: OpCall) -> dict:
    return {k: call.params[k] for k in _CONV_KEYS if k in call.params}


def run_canonical(layer: LayerInfo, call: OpCall, op: Callable):
    """`op(left, right, ...)` in canonical form (output channels last): op is a
    `lax.conv_general_dilated` or `lax.dot_general` replacement (left, right,
    dimension numbers / conv arguments)."""
    c = canonical(layer, call)
    if call.prim == "conv":
        kw = _conv_kwargs(call)
        return op(c.left, c.right, kw.pop("window_strides"), kw.pop("padding"), **kw)
    return op(c.left, c.right, c.dimension_numbers)


def run(layer: LayerInfo, call: OpCall, op: Callable, corr=None):
    """`run_canonical`, in the primitive's layout, minus `corr` per channel."""
    out = run_canonical(layer, call, op)
    return _finish(canonical(layer, call), out, call, corr)


def float_op(call: OpCall) -> Callable:
    """The primitive itself as a (left, right, ...) op."""
    if call.prim == "conv":
        return lax.conv_general_dilated
    return lambda a, b, dn: lax.dot_general(
        a, b, dn, precision=call.params.get("precision")
    )


def quantized(layer, call, left: numerics.ActQuant, right, corr=None):
    """The op fake-quantized through AQT: `left` per tensor, `right` per channel
    (a weight) or per tensor (an activation)."""
    if call.prim == "conv":
        return run(layer, call, numerics.conv_general_dilated(left, right), corr)
    return run(layer, call, numerics.dot_general(left, right), corr)


def quantized_in_float(layer, call, left: numerics.ActQuant, right: numerics.ActQuant):
    """`quantized` for a matmul of two activations (both per tensor), its integer
    arithmetic done in float: each operand fake-quantized as AQT quantizes it,
    then the float dot. The same to f32 rounding (the products are small integers
    times the scales), with no int8 kernel: for op-by-op callers (the gptaq pass,
    jit off under the interceptor): XLA:GPU computes a lone int8 batched
    dot_general wrong at some shapes, which broke gptaq on the H100 (docs/qwix.md)."""

    def op(a, b, dimension_numbers):
        a = numerics.fake_quant_activation(a, left)[0]
        b = numerics.fake_quant_activation(b, right)[0]
        return float_op(call)(a, b, dimension_numbers)

    return run(layer, call, op)


def served(
    layer, call, left: numerics.ActQuant, qvalue, scale, corr=None, conv_dtype=None
):
    """AQT SERVE: the weight operand is replaced by its frozen int8 `qvalue` and
    per-channel `scale` (flat [C])."""
    c = canonical(layer, call)
    if call.prim == "conv":
        op = numerics.served_conv_general_dilated(left, qvalue, scale, conv_dtype)
    else:
        op = numerics.served_dot_general(left, qvalue, scale, c.right_contracting)
    # The weight operand is ignored (the frozen one replaces it); AQT still wants
    # a float there, and a model that does not cast its params hands it int8.
    return run(
        layer, call, lambda a, b, *r, **k: op(a, b.astype(a.dtype), *r, **k), corr
    )


def operands(layer: LayerInfo, call: OpCall) -> tuple[Any, Any]:
    """(left, right) of the call in canonical form."""
    c = canonical(layer, call)
    return c.left, c.right


def weight_2d(w: jax.Array, contracting: tuple[int, ...]) -> jax.Array:
    """A weight as [rows, C]: its contracted axes first, output channels last."""
    free = [i for i in range(w.ndim) if i not in contracting]
    w = jnp.transpose(w, (*contracting, *free))
    return w.reshape(-1, math.prod(w.shape[len(contracting) :]))
