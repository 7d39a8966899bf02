"""Saving and loading a calibration (the precision solver's stored results).

One directory: `arrays/` (orbax: per-layer activation bounds and weight clip ratios
for every candidate width, bias corrections for every width pair if made) and
`calibration.json` (candidates, layer names, the model's fingerprint, settings).
A PTQ method that rewrites weights (`--method gptq`) adds `w_kernel`: every
conv/dense weight at every width, f32[K, *kernel_shape] a layer.
Written to a temporary sibling and renamed, so a failed save leaves the previous
calibration intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from tmpq_jax.checkpoint import restore_tree, save_tree_and_json
from tmpq_jax.errors import UserError
from tmpq_jax.quant.calibration import calibration_widths
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QParams

FORMAT = "tmpq-calibration"
VERSION = 1
META_FILE = "calibration.json"
ARRAYS_DIR = "arrays"


def _per_layer(arrays) -> dict:
    return {f"{i:04d}": a for i, a in enumerate(arrays or ()) if a is not None}


def _arrays(qparams: QParams) -> dict:
    tree = {"act_bound": qparams.act_bound, "w_clip": _per_layer(qparams.w_clip)}
    if qparams.bias_corr is not None:
        tree["bias_corr"] = _per_layer(qparams.bias_corr)
    if qparams.w_kernel is not None:
        tree["w_kernel"] = _per_layer(qparams.w_kernel)
    return tree


def save_calibration(
    path: str | os.PathLike,
    qparams: QParams,
    registry: LayerRegistry,
    candidates: Sequence[int],
    settings: dict | None = None,
    model_fingerprint: str | None = None,
) -> Path:
    """Writes `qparams` + calibration.json to `path` atomically (a temporary
    sibling renamed into place; nothing is left behind if writing fails)."""
    if qparams.act_bound is None or qparams.w_clip is None:
        raise UserError("only a complete calibration (act_bound and w_clip) is saved.")
    meta = dict(
        format=FORMAT,
        version=VERSION,
        candidates=[int(c) for c in candidates],
        bit_widths=list(qparams.bit_widths),
        layer_names=list(registry.names),
        bias_corrected=qparams.bias_corr is not None,
        # a PTQ method's per-width weights (GPTQ): readers that know no
        # `stored_weights` must not load this calibration (see load_calibration)
        stored_weights=qparams.w_kernel is not None,
        settings=settings or {},
        model_fingerprint=model_fingerprint,
    )
    return save_tree_and_json(path, ARRAYS_DIR, _arrays(qparams), META_FILE, meta)


def read_calibration_meta(path: str | os.PathLike) -> dict:
    file = Path(path) / META_FILE
    if not file.is_file():
        raise UserError(f"no calibration at {path} (no {META_FILE}); run calibration.")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: corrupt JSON ({e}); recalibrate.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{file}: not a tmpq calibration; recalibrate.")
    return meta


def load_calibration(
    path: str | os.PathLike,
    registry: LayerRegistry,
    candidates: Sequence[int],
    model_fingerprint: str | None = None,
) -> tuple[QParams, dict]:
    """(QParams, meta) from `save_calibration`'s directory. UserError if it was made
    for other layers, another candidate set or (when given) another model."""
    meta = read_calibration_meta(path)
    cands = [int(c) for c in candidates]
    if meta.get("candidates") != cands:
        raise UserError(
            f"{path}: calibrated for candidate bits {meta.get('candidates')}, "
            f"not {cands}; recalibrate with these candidates."
        )
    if meta.get("layer_names") != list(registry.names):
        raise UserError(
            f"{path}: calibrated for another model's layers "
            f"({len(meta.get('layer_names') or [])} vs {len(registry)}); recalibrate."
        )
    fp = meta.get("model_fingerprint")
    if model_fingerprint is not None and fp != model_fingerprint:
        raise UserError(
            f"{path}: calibrated for model {fp}, not {model_fingerprint}; recalibrate."
        )
    widths = tuple(int(b) for b in meta.get("bit_widths") or ())
    if widths != calibration_widths(cands, registry):
        raise UserError(f"{path}: bad bit_widths {list(widths)}; recalibrate.")
    n, k = len(registry), len(widths)
    like = {
        "act_bound": jax.ShapeDtypeStruct((n, 2, k), jnp.float32),
        "w_clip": {
            f"{i:04d}": jax.ShapeDtypeStruct((k, layer.channels), jnp.float32)
            for i, layer in enumerate(registry)
            if layer.kernel_shape
        },
    }
    corrected = bool(meta.get("bias_corrected"))
    if corrected:
        like["bias_corr"] = {
            f"{i:04d}": jax.ShapeDtypeStruct(
                (k, k, layer.channels), jnp.float32
            )
            for i, layer in enumerate(registry)
            if layer.kernel_shape
        }
    kernels = bool(meta.get("stored_weights"))
    if kernels:
        like["w_kernel"] = {
            f"{i:04d}": jax.ShapeDtypeStruct((k, *layer.kernel_shape), jnp.float32)
            for i, layer in enumerate(registry)
            if layer.kernel_shape
        }
    tree = restore_tree(
        Path(path) / ARRAYS_DIR,
        like,
        f"{path}: cannot restore calibration",
        "it is corrupt: recalibrate.",
    )

    def per_layer(name):
        return tuple(
            tree[name][f"{i:04d}"] if layer.kernel_shape else None
            for i, layer in enumerate(registry)
        )

    corr = per_layer("bias_corr") if corrected else None
    kern = per_layer("w_kernel") if kernels else None
    qp = QParams(widths, tree["act_bound"], per_layer("w_clip"), corr, kern)
    return qp, meta
