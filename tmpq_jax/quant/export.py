"""Real low-bit weights: a concrete genome through AQT's CONVERT / SERVE.

TMPQ-DM (arXiv 2404.09532) ends with one genome: per-layer widths (and timesteps).
`convert` freezes it: every registered conv/dense kernel becomes AQT's quantized
tensor at that layer's `w_bits` with its calibrated clip ratio (`QParams.w_clip`
selected at that width), i.e. int8 values in +-(2**(b-1)-1) plus a float32 scale
per output channel. `serve_apply` runs the model from those int8 weights.

This is AQT's own CONVERT/SERVE mechanism, used through its functional entry points
(the supernet does not use AQT's Flax modules, see `numerics.py`):
  * CONVERT = AQT's quantizer computing the kernel's `QTensor` (qvalue + scale),
    with the very numerics/calibration objects the fake-quant ops use;
  * SERVE = that `QTensor` handed to AQT's dot_general (`DotGeneral.dg_core`) and
    conv (`make_conv_general_dilated_with_qt`) as `rhs_qt`, which replaces the
    kernel's quantization: what AQT's Flax `Freezer` does in SERVE mode.
What AQT's Freezer adds is only the storage (an `aqt` variable collection next to
the float kernel). Here the storage is explicit and the float kernels are gone:

    QuantizedModel.variables = {
      "params": the model's params, each registered kernel replaced by its int8
                qvalue (Flax checks a param's shape, not its dtype),
      "aqt":    {<module path>: {"scale": float32[C_out],
                                 "bias_corr": float32[C_out] (if calibrated)}},
    }

plus the genome's bits and the static activation bounds selected at its widths
(`act_bound` float32[L, 2]; None: dynamic absmax), so a `QuantizedModel` is
self-contained: `save_quantized` / `load_quantized` write it with orbax.
Activations stay fake-quantized per tensor exactly as in `supernet.py`; biases and
norms stay float; a calibrated bias correction (`QParams.bias_corr` at the
genome's widths) is subtracted from the layer's output as the supernet does. SERVE equals the fake-quant `quantized_apply` bit for bit: both
run the same AQT ops on the same int8 qvalue and scale (tests/test_quant_export.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tmpq_jax.checkpoint import restore_tree, save_tree_and_json
from tmpq_jax.errors import UserError
from tmpq_jax.quant import numerics
from tmpq_jax.quant.registry import LayerRegistry, layer_kind
from tmpq_jax.quant.supernet import (
    DEFAULT_CANDIDATES,
    QParams,
    QuantBits,
    _is_rerun,
    _rerun,
    bias_corr_at,
    call_with_op,
    check_bits,
    check_qparams,
    corrected,
)

COLLECTION = "aqt"  # AQT's default quant_collection name
FORMAT = "tmpq-int8-export"
VERSION = 1
META_FILE = "export.json"
ARRAYS_DIR = "arrays"


@struct.dataclass
class QuantizedModel:
    """A frozen genome: int8 kernels + scales (`variables`), bits, act bounds."""

    variables: dict  # {"params": ... (int8 kernels), "aqt": {path: {"scale": f32[C]}}}
    bits: QuantBits  # int32[L] each: the genome's widths
    act_bound: jax.Array | None = (
        None  # f32[L, 2] at the genome's widths; None: dynamic
    )


# ----------------------------------------------------------------------------
# CONVERT.


def _get(tree: Any, path: Sequence[str]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set_in(tree: dict, path: Sequence[str], key: str, value) -> None:
    for p in path:
        tree = tree.setdefault(p, {})
    tree[key] = value


def _copy(tree: Any) -> Any:
    """Nested dicts copied (leaves shared), so `convert` never edits its input."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _concrete_bits(bits: QuantBits) -> tuple[np.ndarray, np.ndarray]:
    if any(isinstance(v, jax.core.Tracer) for v in (bits.w_bits, bits.a_bits)):
        raise UserError(
            "convert a concrete genome (outside jit/vmap), not traced bits."
        )
    return np.asarray(bits.w_bits), np.asarray(bits.a_bits)


def freeze(
    params: Any,
    registry: LayerRegistry,
    bits: QuantBits,
    qparams: QParams | None = None,
) -> QuantizedModel:
    """CONVERT with *traced* bits (under jit/vmap, no checks): the `QuantizedModel`
    of one genome, its calibrated results selected as the supernet selects them.
    The search freezes each candidate once and samples through `serve_apply`, so a
    kernel is quantized once per genome, not once per layer call per step; SERVE
    equals the fake-quant path bit for bit, so the fitness is unchanged."""
    new_params, scales = _copy(params), {}
    bounds = []
    for i, layer in enumerate(registry):
        left = layer.pinned_lhs_bits or bits.a_bits[i]
        lb = rb = jnp.float32(0.0)
        if qparams is not None and qparams.act_bound is not None:
            row = qparams.act_bound[i]
            lb = jnp.take(row[0], qparams.width_index(left))
            if layer.kind == "matmul":
                rb = jnp.take(row[1], qparams.width_index(bits.w_bits[i]))
        bounds.append(jnp.stack([lb, rb]))
        if layer.kind == "matmul":
            continue
        clip = None
        if qparams is not None and qparams.w_clip is not None:
            clip = jnp.take(
                qparams.w_clip[i], qparams.width_index(bits.w_bits[i]), axis=0
            )
        node = _get(new_params, layer.path)
        node["kernel"], scale = numerics.convert_weight(
            node["kernel"], numerics.WeightQuant(bits.w_bits[i], clip)
        )
        _set_in(scales, layer.path, "scale", scale)
        corr = bias_corr_at(i, bits, qparams)
        if corr is not None:
            _set_in(scales, layer.path, "bias_corr", corr)
    dynamic = qparams is None or qparams.act_bound is None
    return QuantizedModel(
        variables={"params": new_params, COLLECTION: scales},
        bits=bits,
        act_bound=None if dynamic else jnp.stack(bounds),
    )


_freeze = jax.jit(freeze, static_argnums=1)  # one compile per model: bits traced


def convert(
    params: Any,
    registry: LayerRegistry,
    bits: QuantBits,
    qparams: QParams | None = None,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
) -> QuantizedModel:
    """AQT CONVERT of a concrete genome (bits int32[L]): every registered conv/dense
    kernel of `params` (the model's 'params' collection) becomes int8 + scales."""
    check_bits(bits, registry, candidates)
    if qparams is not None:
        check_qparams(qparams, registry, candidates)
    _concrete_bits(bits)
    for layer in registry:
        if layer.kind != "matmul" and not _has_kernel(params, layer.path):
            raise UserError(
                f"params have no kernel for layer {layer.name!r}; convert the "
                "'params' collection of the model the registry was built for."
            )
    bits = QuantBits(
        jnp.asarray(bits.w_bits, jnp.int32), jnp.asarray(bits.a_bits, jnp.int32)
    )
    qmodel = _freeze(params, registry, bits, qparams)
    w = np.asarray(bits.w_bits)
    for i, layer in enumerate(registry):
        if layer.kind == "matmul":
            continue
        qvalue = _get(qmodel.variables["params"], layer.path)["kernel"]
        bound = 2 ** (int(w[i]) - 1) - 1
        if qvalue.dtype != jnp.int8 or int(jnp.max(jnp.abs(qvalue))) > bound:
            raise AssertionError(f"{layer.name}: AQT CONVERT left int8 +-{bound}")
    return qmodel


def _has_kernel(params: Any, path: Sequence[str]) -> bool:
    try:
        return "kernel" in _get(params, path)
    except (KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------
# SERVE.


def _act_specs(i: int, registry, qmodel: QuantizedModel):
    layer = registry[i]
    lb = rb = None
    if qmodel.act_bound is not None:
        lb, rb = qmodel.act_bound[i, 0], qmodel.act_bound[i, 1]
    left = numerics.ActQuant(layer.pinned_lhs_bits or qmodel.bits.a_bits[i], lb)
    if layer.kind == "matmul":
        return left, numerics.ActQuant(qmodel.bits.w_bits[i], rb)
    return left, None


def _frozen_kernel(module: nn.Module, name: str) -> tuple[jax.Array, jax.Array]:
    qvalue = module.get_variable("params", "kernel")
    scale = module.get_variable(COLLECTION, "scale")
    if qvalue is None or scale is None or qvalue.dtype != jnp.int8:
        raise UserError(
            f"layer {name!r} has no frozen int8 kernel and scale; serve the "
            "variables of a QuantizedModel made by convert()."
        )
    return qvalue, scale


def make_serve_interceptor(
    qmodel: QuantizedModel, registry: LayerRegistry, conv_dtype=None
):
    """A Flax method interceptor running every registered conv/dense from its frozen
    int8 kernel (AQT SERVE) and every MatMul as the supernet does. `conv_dtype`:
    see `numerics.served_conv_general_dilated` (bfloat16 on accelerators)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        kind = layer_kind(module)
        if kind is None or context.method_name != "__call__" or _is_rerun(module):
            return next_fun(*args, **kwargs)
        i = registry.index_of_path(module.path)
        left, right = _act_specs(i, registry, qmodel)
        if kind == "matmul":
            return _rerun(module, kind, left, right, args, kwargs)
        qvalue, scale = _frozen_kernel(module, registry[i].name)
        corr = module.get_variable(COLLECTION, "bias_corr")
        if kind == "conv":
            op = numerics.served_conv_general_dilated(left, qvalue, scale, conv_dtype)
        else:
            op = numerics.served_dot_general(left, qvalue, scale)
        return call_with_op(module, kind, corrected(op, corr), args, kwargs)

    return interceptor


def serve_apply(
    model: nn.Module,
    qmodel: QuantizedModel,
    *args,
    registry: LayerRegistry,
    conv_dtype=None,
    **apply_kwargs,
):
    """`model.apply` from the frozen int8 weights of `qmodel` (jittable; `qmodel` is
    a pytree). Equals `quantized_apply` with the genome and QParams it came from
    (with `conv_dtype=bfloat16`: wherever convolution sums stay below 2**24)."""
    with nn.intercept_methods(make_serve_interceptor(qmodel, registry, conv_dtype)):
        return model.apply(qmodel.variables, *args, **apply_kwargs)


# ----------------------------------------------------------------------------
# Saving and loading (orbax arrays + export.json).


def _bias_corrected(qmodel: QuantizedModel) -> bool:
    leaves = jax.tree_util.tree_leaves_with_path(qmodel.variables[COLLECTION])
    return any(getattr(p[-1], "key", None) == "bias_corr" for p, _ in leaves)


def _tree(qmodel: QuantizedModel) -> dict:
    bits = {"w_bits": qmodel.bits.w_bits, "a_bits": qmodel.bits.a_bits}
    t = {"variables": qmodel.variables, "bits": bits}
    if qmodel.act_bound is not None:
        t["act_bound"] = qmodel.act_bound
    return t


def save_quantized(
    path: str | os.PathLike,
    qmodel: QuantizedModel,
    registry: LayerRegistry,
    genome: dict | None = None,
) -> Path:
    """Writes `qmodel` to `path` atomically; `genome` (a genome_file dict) is kept
    in export.json for provenance."""
    meta = dict(
        format=FORMAT,
        version=VERSION,
        layer_names=list(registry.names),
        dynamic_activations=qmodel.act_bound is None,
        bias_corrected=_bias_corrected(qmodel),
        genome=genome,
    )
    return save_tree_and_json(path, ARRAYS_DIR, _tree(qmodel), META_FILE, meta)


def load_quantized(
    path: str | os.PathLike, registry: LayerRegistry, params_like: Any
) -> tuple[QuantizedModel, dict]:
    """(QuantizedModel, meta) from `save_quantized`'s directory; `params_like`: the
    float model's params or their shapes (`jax.eval_shape` of init)."""
    file = Path(path) / META_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(
            f"no readable int8 export at {path} (no {META_FILE})."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{file}: not a tmpq int8 export; export it again.")
    if meta.get("layer_names") != list(registry.names):
        raise UserError(f"{path}: exported from another model's layers; re-export.")
    n = len(registry)
    like_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _copy(params_like)
    )
    scales: dict = {}
    keys = ("scale", "bias_corr") if meta.get("bias_corrected") else ("scale",)
    for layer in registry:
        if layer.kernel_shape:
            node = _get(like_params, layer.path)
            node["kernel"] = jax.ShapeDtypeStruct(layer.kernel_shape, jnp.int8)
            per_channel = jax.ShapeDtypeStruct((layer.kernel_shape[-1],), jnp.float32)
            for key in keys:
                _set_in(scales, layer.path, key, per_channel)
    bits = jax.ShapeDtypeStruct((n,), jnp.int32)
    like = {
        "variables": {"params": like_params, COLLECTION: scales},
        "bits": {"w_bits": bits, "a_bits": bits},
    }
    if not meta.get("dynamic_activations"):
        like["act_bound"] = jax.ShapeDtypeStruct((n, 2), jnp.float32)
    tree = restore_tree(
        Path(path) / ARRAYS_DIR,
        like,
        f"{path}: cannot restore the int8 export",
        "export the genome again.",
    )
    qmodel = QuantizedModel(
        variables=tree["variables"],
        bits=QuantBits(**tree["bits"]),
        act_bound=tree.get("act_bound"),
    )
    return qmodel, meta
