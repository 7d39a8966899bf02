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
      "params": the model's params, each registered weight replaced by its int8
                qvalue (Flax checks a param's shape, not its dtype; the model
                casts it back to float, exactly, and SERVE reads it there),
      "aqt":    {<layer index, 4 digits>: {"scale": float32[C_out],
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tmpq_jax.checkpoint import restore_tree, save_tree_and_json
from tmpq_jax.errors import UserError
from tmpq_jax.quant import intercept, numerics, ops
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import (
    DEFAULT_CANDIDATES,
    QParams,
    QuantBits,
    bias_corr_at,
    check_bits,
    check_qparams,
    kernel_at,
    operand_specs,
)

COLLECTION = "aqt"  # AQT's default quant_collection name
FORMAT = "tmpq-int8-export"
VERSION = 2  # 2: scales keyed by layer index (op-level registry)
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


def _key(i: int) -> str:
    return f"{i:04d}"


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
        left, right = operand_specs(i, registry, bits, qparams)
        zero = jnp.float32(0.0)
        rb = right.bound if layer.kind == "matmul" else None
        bounds.append(
            jnp.stack([zero if b is None else b for b in (left.bound, rb)])
        )
        if layer.kind == "matmul":
            continue
        node = _get(new_params, layer.param_path[:-1])
        leaf = layer.param_path[-1]
        node[leaf] = _stored_kernel(i, layer, bits, qparams, node[leaf])
        node[leaf], scale = numerics.convert_weight(
            node[leaf], right, layer.weight_contracting
        )
        scales[_key(i)] = {"scale": scale}
        corr = bias_corr_at(i, bits, qparams)
        if corr is not None:
            scales[_key(i)]["bias_corr"] = corr
    dynamic = qparams is None or qparams.act_bound is None
    return QuantizedModel(
        variables={"params": new_params, COLLECTION: scales},
        bits=bits,
        act_bound=None if dynamic else jnp.stack(bounds),
    )


def _stored_kernel(i, layer, bits, qparams, param):
    """The weight CONVERT quantizes: a PTQ method's stored weight at the layer's
    width (`supernet.kernel_at`, e.g. GPTQ's), else the param itself."""
    kern = kernel_at(i, bits, qparams)
    if kern is None:
        return param
    if jnp.shape(kern) != jnp.shape(param):
        raise UserError(
            f"layer {layer.name!r}: the calibration's stored weight has shape "
            f"{jnp.shape(kern)}, its param {jnp.shape(param)}; this calibration "
            "cannot be exported for this model."
        )
    return kern.astype(param.dtype)


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
    check_freezable(registry)
    for layer in registry:
        if layer.kind != "matmul" and not _has_param(params, layer.param_path):
            raise UserError(
                f"params have no weight {'/'.join(map(str, layer.param_path))!r} for layer "
                f"{layer.name!r}; convert the 'params' collection of the model the "
                "registry was built for."
            )
    bits = QuantBits(
        jnp.asarray(bits.w_bits, jnp.int32), jnp.asarray(bits.a_bits, jnp.int32)
    )
    qmodel = _freeze(params, registry, bits, qparams)
    w = np.asarray(bits.w_bits)
    for i, layer in enumerate(registry):
        if layer.kind == "matmul":
            continue
        qvalue = _get(qmodel.variables["params"], layer.param_path)
        bound = 2 ** (int(w[i]) - 1) - 1
        if qvalue.dtype != jnp.int8 or int(jnp.max(jnp.abs(qvalue))) > bound:
            raise AssertionError(f"{layer.name}: AQT CONVERT left int8 +-{bound}")
    return qmodel


def check_freezable(registry: LayerRegistry) -> None:
    """UserError unless every weight is a param of its own (CONVERT replaces it)."""
    bad = [x.name for x in registry if x.kind != "matmul" and x.param_path is None]
    if bad:
        raise UserError(
            f"layers {bad[:3]} multiply by a weight computed from params, not a "
            "param itself; int8 export needs the param: evaluate such a model "
            "with quantized_apply (fake-quant)."
        )


def _has_param(params: Any, path: Sequence[str]) -> bool:
    try:
        _get(params, path)
        return True
    except (KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------
# SERVE.


def make_serve_handler(qmodel: QuantizedModel, registry: LayerRegistry, conv_dtype=None):
    """An op handler running every registered conv/dense from its frozen int8
    weight (AQT SERVE) and every matmul as the supernet does. `conv_dtype`: see
    `numerics.served_conv_general_dilated` (bfloat16 on accelerators)."""
    store = qmodel.variables[COLLECTION]

    def handler(call):
        i = registry.index_of_site(call.site)
        if i is None:
            return call.original()
        layer = registry[i]
        left, right = operand_specs(i, registry, qmodel.bits, None, qmodel.act_bound)
        if layer.kind == "matmul":
            return ops.quantized(layer, call, left, right)
        # The model multiplies by its param, now the int8 qvalue cast to its dtype:
        # the cast back is exact (|q| <= 127).
        qvalue = ops.canonical(layer, call).right.astype(jnp.int8)
        entry = store[_key(i)]
        return ops.served(
            layer, call, left, qvalue, entry["scale"], entry.get("bias_corr"), conv_dtype
        )

    return handler


def _check_frozen(qmodel: QuantizedModel, registry: LayerRegistry) -> None:
    for i, layer in enumerate(registry):
        if layer.kind == "matmul":
            continue
        try:
            w = _get(qmodel.variables["params"], layer.param_path)
            ok = w.dtype == jnp.int8 and _key(i) in qmodel.variables[COLLECTION]
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise UserError(
                f"layer {layer.name!r} has no frozen int8 weight and scale; serve "
                "the variables of a QuantizedModel made by convert()."
            )


def serve_apply(
    model: Any,
    qmodel: QuantizedModel,
    *args,
    registry: LayerRegistry,
    conv_dtype=None,
    **apply_kwargs,
):
    """`model.apply` from the frozen int8 weights of `qmodel` (jittable; `qmodel` is
    a pytree). Equals `quantized_apply` with the genome and QParams it came from
    (with `conv_dtype=bfloat16`: wherever convolution sums stay below 2**24)."""
    _check_frozen(qmodel, registry)
    handler = make_serve_handler(qmodel, registry, conv_dtype)
    with intercept.intercept(handler):
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
    if meta.get("version") != VERSION:
        raise UserError(
            f"{file}: an int8 export of format version {meta.get('version')}, this "
            f"tmpq_jax reads version {VERSION}; export the genome again."
        )
    if meta.get("layer_names") != list(registry.names):
        raise UserError(f"{path}: exported from another model's layers; re-export.")
    n = len(registry)
    like_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _copy(params_like)
    )
    scales: dict = {}
    keys = ("scale", "bias_corr") if meta.get("bias_corrected") else ("scale",)
    for i, layer in enumerate(registry):
        if layer.kernel_shape:
            node = _get(like_params, layer.param_path[:-1])
            node[layer.param_path[-1]] = jax.ShapeDtypeStruct(
                layer.kernel_shape, jnp.int8
            )
            per_channel = jax.ShapeDtypeStruct((layer.channels,), jnp.float32)
            scales[_key(i)] = {key: per_channel for key in keys}
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
