"""The genome / search-result file: one JSON object, `tmpq-genome/1`.

A TMPQ-DM (arXiv 2404.09532) genome is N sampling timesteps plus two bit-widths per
quantizable layer. On disk, layers are named (registry names, as `tmpq layers`
prints them), so a file stays readable and is checked against the model it is
applied to:

    {"format": "tmpq-genome/1",
     "timesteps": [t_1 < ... < t_N],            # ints in [0, T)
     "candidates": [8, 7, 6, 5],
     "layers": {"conv_in": {"w_bits": 6, "a_bits": 6}, ...},  # every layer, registry order
     "calibration": "checkpoints/fmnist_unet_calib" | null,   # where the QParams came from
     "model_fingerprint": "..." | null,         # quant.calibration.model_fingerprint(card)
     "model": "checkpoints/fmnist_unet" | "factory:FILE.py:fn" | null,  # where it loads from
     "bitops_per_step": ..., "total_bitops": ..., "size_bits": ...,
     ...}                                       # any other key (fid, ...) is kept, ignored

A front search's `front.json` is such a file (its best point) with every point of
the front, each a genome object of its own, under `"front"`; `read_genome(...,
pick=BITOPS)` reads the point with the most total BitOPs at or below BITOPS.

A genome searched on the float model (`space=timesteps_fp`) has
`"full_precision": true`, `"candidates": [32]` and every layer at 32 bits; it is
sampled with the float model and has no calibration.

The left operand of an attention `av` matmul is the softmax output, pinned at 8 bits
(`registry.pinned_lhs_bits`): its `a_bits` gene is inert. It is written as the pinned
width and, on reading, any value there is accepted and mapped to a valid candidate.
Every check runs here, at the boundary, and fails with a one-line `UserError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import ArgumentError, UserError
from tmpq_jax.files import write_json
from tmpq_jax.quant import cost
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QuantBits, check_bits, check_candidates

FORMAT = "tmpq-genome/1"
LIST_LAYERS = "`tmpq layers` lists the model's layer names"


@dataclasses.dataclass(frozen=True)
class Genome:
    """A concrete genome: timesteps int32[N] (ascending), bits int32[L] per field,
    and the file's other keys (`meta`, the whole JSON object)."""

    timesteps: np.ndarray
    bits: QuantBits
    meta: dict

    @property
    def candidates(self) -> tuple[int, ...]:
        return tuple(self.meta["candidates"])


def _check_timesteps(ts, num_timesteps: int, where: str) -> np.ndarray:
    if (
        not isinstance(ts, list | tuple | np.ndarray)
        or len(ts) == 0
        or not all(
            isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ts
        )
    ):
        raise UserError(f"{where}: 'timesteps' must be a non-empty list of integers.")
    arr = np.asarray(ts, np.int64)
    if (np.diff(arr) <= 0).any():
        raise UserError(
            f"{where}: timesteps {arr.tolist()} are not strictly ascending; "
            "list each sampling timestep once, smallest first."
        )
    if arr[0] < 0 or arr[-1] >= num_timesteps:
        raise UserError(
            f"{where}: timesteps must lie in [0, {num_timesteps}), "
            f"got {arr[0]}..{arr[-1]}."
        )
    return arr.astype(np.int32)


def genome_to_dict(
    timesteps: Sequence[int] | np.ndarray,
    bits: QuantBits,
    registry: LayerRegistry,
    candidates: Sequence[int],
    *,
    calibration: str | None = None,
    model_fingerprint: str | None = None,
    model: str | None = None,
    num_timesteps: int = 1000,
    full_precision: bool = False,
    **extra,
) -> dict:
    """The file's JSON object for a concrete genome (bits int32[L] per field), with
    its cost (BitOPs per step and in total, weight bits) computed by `quant.cost`.
    `extra` keys (fid, generation, ...) are stored as given (JSON-serialisable).

    `timesteps` may repeat a step (the sampler's no-op padding, `t_i == t_{i+1}`):
    only the distinct steps are written, which sample identically.
    `full_precision`: searched timesteps on the float model (every layer at
    `cost.FLOAT_BITS`), written with `"full_precision": true`."""
    if full_precision:
        cands = (cost.FLOAT_BITS,)
        if not (np.all(np.asarray(bits.w_bits) == cands[0])
                and np.all(np.asarray(bits.a_bits) == cands[0])):  # fmt: skip
            raise UserError(
                f"a full-precision genome has every layer at {cands[0]} bits."
            )
    else:
        cands = check_candidates(candidates)
        check_bits(bits, registry, cands)
    ts = [int(t) for t in np.asarray(timesteps).reshape(-1).tolist()]
    if any(b < a for a, b in zip(ts, ts[1:], strict=False)):
        raise UserError(
            f"genome timesteps {ts} are not ascending; list them smallest first."
        )
    ts = _check_timesteps(sorted(set(ts)), num_timesteps, "genome")
    w, a = np.asarray(bits.w_bits), np.asarray(bits.a_bits)
    pinned = registry.pinned_lhs_bits
    layers = {
        name: {
            "w_bits": int(w[i]),
            "a_bits": int(a[i] if full_precision else pinned[i] or a[i]),
        }
        for i, name in enumerate(registry.names)
    }
    per_step = float(cost.bitops_per_step(bits, registry))
    return {
        "format": FORMAT,
        "timesteps": ts.tolist(),
        "candidates": list(cands),
        "layers": layers,
        "calibration": None if calibration is None else str(calibration),
        "model_fingerprint": model_fingerprint,
        "model": model,
        "bitops_per_step": per_step,
        "total_bitops": per_step * len(ts),
        "size_bits": float(cost.model_size_bits(bits, registry)),
        **({"full_precision": True} if full_precision else {}),
        **extra,
    }


def write_genome(path: str | os.PathLike, d: dict) -> Path:
    """Writes `d` (from `genome_to_dict`) atomically: serialised first, then a temp
    sibling renamed into place, so a failure never leaves a half-written file."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"not a {FORMAT} genome dict; build it with genome_to_dict.")
    try:
        return write_json(path, d)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: genome is not JSON-serialisable ({e}).") from None


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"no genome file at {path}; give the result.json a search wrote."
        )
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not JSON ({e}); give a {FORMAT} file.") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise UserError(f"{path}: format {got!r}, not {FORMAT!r}; give a genome file.")
    return d


def pick_from_front(d: dict, bitops: float, where: str) -> dict:
    """The point of a front file's `"front"` list (a front search's `front.json`)
    with the most total BitOPs at or below `bitops`: its genome dict."""
    front = d.get("front")
    if not isinstance(front, list) or not front:
        raise ArgumentError(
            "pick",
            f"{where} holds no front; {{arg}} reads the front.json of a search run "
            "with search.objective=front.",
        )
    costs = [p.get("total_bitops") if isinstance(p, dict) else None for p in front]
    if not all(isinstance(c, int | float) for c in costs):
        raise UserError(f"{where}: every front point needs a number 'total_bitops'.")
    if not math.isfinite(bitops):
        raise ArgumentError("pick", f"{{arg}}={bitops}: give a number of BitOPs.")
    fits = [i for i, c in enumerate(costs) if cost.within_budget(c, bitops)]
    if not fits:
        low = min(costs)
        raise ArgumentError(
            "pick",
            f"{{arg}}={bitops:.4g} is below the cheapest point of {where}'s front "
            f"({low:.4g} total BitOPs); use at least {low:.4g}.",
        )
    return front[max(fits, key=lambda i: costs[i])]


def _gene(entry, name: str, field: str, cands, where: str, inert: bool) -> int:
    v = entry.get(field) if isinstance(entry, dict) else None
    if inert:  # the pinned softmax operand: any value, mapped to a valid candidate
        return int(v) if isinstance(v, int) and v in cands else cands[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise UserError(
            f"{where}: layer {name!r} needs integer 'w_bits' and 'a_bits', got {entry!r}."
        )
    if v not in cands:
        raise UserError(
            f"{where}: layer {name!r} has {field} {v}, outside the candidate set "
            f"{list(cands)}."
        )
    return v


def read_genome(
    path: str | os.PathLike,
    registry: LayerRegistry,
    candidates: Sequence[int] | None = None,
    num_timesteps: int = 1000,
    pick: float | None = None,
) -> Genome:
    """Reads and validates a genome file against `registry` (layer names, all
    present), `candidates` (default: the file's own) and the timestep range.
    `pick`: a front file's point closest to (at or below) these total BitOPs."""
    path = Path(path)
    where = str(path)
    d = _load_json(path)
    if pick is not None:
        d = pick_from_front(d, pick, where)
        where = f"{where} (the front's point of {d['total_bitops']:.4g} BitOPs)"
    return genome_from_dict(d, registry, candidates, num_timesteps, where)


def genome_from_dict(
    d: dict,
    registry: LayerRegistry,
    candidates: Sequence[int] | None = None,
    num_timesteps: int = 1000,
    where: str = "genome",
) -> Genome:
    """`read_genome`'s checks on a genome already loaded (a result file's dict, or
    a results-table row with `timesteps` and `layers`)."""
    if d.get("full_precision") is True:  # the float model: nothing to calibrate
        cands = (cost.FLOAT_BITS,)
    elif candidates is None:
        if "candidates" not in d:
            raise UserError(
                f"{where}: no 'candidates' list; write it with write_genome."
            )
        try:
            cands = check_candidates(d["candidates"])
        except (TypeError, ValueError):
            raise UserError(f"{where}: bad 'candidates' {d['candidates']!r}.") from None
    else:
        cands = check_candidates(candidates)
    layers = d.get("layers")
    if not isinstance(layers, dict):
        raise UserError(f"{where}: 'layers' must map layer names to their bits.")
    known = set(registry.names)
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise UserError(
            f"{where}: unknown layer name {unknown[0]!r} ({len(unknown)} unknown); "
            f"{LIST_LAYERS}."
        )
    missing = [n for n in registry.names if n not in layers]
    if missing:
        raise UserError(
            f"{where}: {len(layers)} layers given, the model has {len(registry)}; "
            f"missing {missing[0]!r}; give w_bits and a_bits for every layer "
            f"({LIST_LAYERS})."
        )
    pinned = registry.pinned_lhs_bits
    w = [_gene(layers[n], n, "w_bits", cands, where, False) for n in registry.names]
    a = [
        _gene(layers[n], n, "a_bits", cands, where, bool(pinned[i]))
        for i, n in enumerate(registry.names)
    ]
    ts = _check_timesteps(d.get("timesteps"), num_timesteps, where)
    bits = QuantBits(jnp.asarray(w, jnp.int32), jnp.asarray(a, jnp.int32))
    meta = {**d, "candidates": list(cands)}
    return Genome(timesteps=ts, bits=bits, meta=meta)
