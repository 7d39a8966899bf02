"""A Qwix export on disk, and served by Qwix alone (`quant/qwix_export.py`).

One new directory: `qwix_export.json` (format, the Qwix version it was made
with, the rules as JSON, one report row per op, the genome, the example input
shapes) and `params.npz` (Qwix's PTQ params, keyed by their path in Qwix's own
pre-quantized layout, `conv_in/kernel/array/qvalue`, kernels' integers in int8).
`load_qwix_export` rebuilds the rules, runs stock `qwix.quantize_model` and puts
the arrays in place (NNX: Qwix's own `process_prequantized_params`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError
from tmpq_jax.files import default_mode
from tmpq_jax.quant.qwix_export import (
    FORMAT,
    META_FILE,
    PARAMS_FILE,
    VERSION,
    QwixExport,
    check_qwix,
    flat_key,
    key_path,
    make_rule,
    zeros_of,
)


def save_qwix_export(
    path: str | os.PathLike, export: QwixExport, genome: dict | None = None
) -> Path:
    """Writes `export` to a new directory `path` (refused if it exists and is not
    empty): `qwix_export.json` (rules, per-layer report, genome) and `params.npz`;
    written to a temporary sibling, renamed into place once complete."""
    path = Path(path).resolve()
    check_out(path)
    meta = dict(
        format=FORMAT,
        version=VERSION,
        qwix_version=check_qwix().__version__,
        rules=export.rules,
        layers=export.layers,
        example_inputs=export.example_inputs,
        genome=genome,
    )
    text = json.dumps(meta, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(default_mode(directory=True))
        np.savez(tmp / PARAMS_FILE, **export.arrays)
        (tmp / META_FILE).write_text(text)
        for f in tmp.iterdir():
            f.chmod(default_mode())
        check_out(path)
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_out(path: str | os.PathLike) -> None:
    """UserError if `path` exists and is not an empty directory."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(
            f"--out {path} exists and is not empty; give a new directory (nothing "
            "is overwritten)."
        )


def read_qwix_export(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of an export directory."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        with np.load(path / PARAMS_FILE) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"no readable Qwix export at {path}.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a tmpq Qwix export.")
    if meta.get("version") != VERSION:
        raise UserError(
            f"{path}: a Qwix export of version {meta.get('version')}, this tmpq_jax "
            f"reads version {VERSION}; export the genome again."
        )
    return meta, arrays


def load_qwix_export(path: str | os.PathLike, model: Any, *example_args):
    """The exported genome served by Qwix alone (no tmpq_jax numerics).

    Linen `model`: returns `(qwix_model, variables)`; run
    `qwix_model.apply(variables, *inputs)`. NNX `model` (an `nnx.Module` holding
    its float params): returns the Qwix model; call it. `example_args`: inputs
    of the exported shapes (default: zeros of them)."""
    from flax import nnx

    qwix = check_qwix()
    meta, arrays = read_qwix_export(path)
    if not example_args:
        example_args = [jnp.zeros(s, d) for s, d in meta["example_inputs"]]
    provider = qwix.PtqProvider([make_rule(qwix, r) for r in meta["rules"]])
    if isinstance(model, nnx.Module):
        qm = qwix.quantize_model(model, provider, *example_args)
        ckpt: dict = {}
        for key, value in arrays.items():
            *head, last = [int(k) if k.isdigit() else k for k in key.split("/")]
            node = ckpt
            for k in head:
                node = node.setdefault(k, {})
            node[last] = jnp.asarray(value)
        nnx.update(qm, qwix.process_prequantized_params(ckpt, qm))
        return qm
    qm = qwix.quantize_model(model, provider)
    template = jax.eval_shape(
        lambda: qm.init(jax.random.key(0), *zeros_of(example_args))
    )["params"]

    def fill(p, leaf):
        key = flat_key(key_path(p))
        if key not in arrays:
            raise UserError(f"{path}: no array {key!r}; export the genome again.")
        value = arrays[key]
        if value.shape != leaf.shape:
            raise UserError(
                f"{path}: {key!r} has shape {value.shape}, not {leaf.shape}."
            )
        return jnp.asarray(value).astype(leaf.dtype)

    return qm, {"params": jax.tree_util.tree_map_with_path(fill, template)}
