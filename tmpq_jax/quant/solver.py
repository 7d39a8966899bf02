"""The precision solver, end to end: min-MSE, then optionally reconstruction,
then bias correction, all on one calibration set; once per candidate width.

`solve` is what `tmpq calibrate`, the search (when no calibration fits) and the
benchmarks run; its `settings` are what `save_calibration` records, so a saved
calibration says how it was made.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax

from tmpq_jax.errors import UserError
from tmpq_jax.quant import reconstruction as rc
from tmpq_jax.quant.bias_correction import bias_corrections
from tmpq_jax.quant.calibration import calibrate, calibration_set
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QParams


def with_bias_correction(
    lm,
    qparams: QParams,
    seed: int,
    num_timesteps: int = 20,
    num_samples: int = 32,
    *,
    registry: LayerRegistry | None = None,
    progress: bool = False,
) -> QParams:
    """`qparams` with bias corrections (`bias_correction.py`) made for its ranges
    on the calibration set of `seed` (the set `solve` calibrated on)."""
    registry = registry if registry is not None else lm.layer_registry()
    xs, ts = calibration_set(
        lm, jax.random.fold_in(jax.random.key(seed), 0), num_timesteps, num_samples
    )
    corr = bias_corrections(
        lm.model, lm.params, registry, qparams, xs, ts, progress=progress
    )
    return qparams.replace(bias_corr=corr)


# PTQ methods (`tmpq calibrate --method`): how the weights are rounded, on top of
# the min-MSE ranges. minmse: round to nearest (today's default); gptq: GPTQ's
# error-feedback rounding per width (`gptq.py`, ported from Qwix's contrib), each
# layer on the float model's inputs; gptq_seq: GPTQ layer after layer on the
# inputs of the model quantized so far (`gptq_seq.py`, GPTQ's paper); gptaq: as
# gptq_seq, aiming at the float model's output (later layers make up for the
# error of earlier ones, GPTAQ's asymmetric target); gptaq_clip: gptaq with each
# channel's clip ratio picked for GPTQ's output error among CLIP_GRID x min-MSE's.
METHODS = ("minmse", "gptq", "gptq_seq", "gptaq", "gptaq_clip")
CLIP_GRID = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25)


def check_method(method: str, reconstruct_steps: int = 0) -> str:
    if method not in METHODS:
        raise UserError(
            f"calibration method {method!r} is unknown; use one of {', '.join(METHODS)}."
        )
    if method != "minmse" and reconstruct_steps:
        raise UserError(
            f"--method {method} rewrites the weights; block reconstruction learns "
            "ranges for the model's own weights: use one of them, not both."
        )
    return method


def with_method(
    lm, qparams, key, method, num_timesteps, num_samples, registry, progress
):
    """(qparams, info) with `method`'s weights added (min-MSE: unchanged), made on
    the calibration set of `key` (the one `calibrate` used: fold 0; fold 3 draws
    the Hessian's rows)."""
    if method == "minmse":
        return qparams, {}
    from tmpq_jax.quant.gptq import gptq_qparams
    from tmpq_jax.quant.gptq_seq import gptq_seq_qparams

    xs, ts, *extra = calibration_set(
        lm, jax.random.fold_in(key, 0), num_timesteps, num_samples
    )
    if method in ("gptq_seq", "gptaq", "gptaq_clip"):
        grid = CLIP_GRID if method == "gptaq_clip" else (1.0,)
        return gptq_seq_qparams(
            lm.model, lm.params, registry, qparams, xs, ts, jax.random.fold_in(key, 3),
            extra=tuple(extra), compensate=method != "gptq_seq", grid=grid,
            progress=progress,
        )  # fmt: skip
    return gptq_qparams(
        lm.model, lm.params, registry, qparams, xs, ts, jax.random.fold_in(key, 3),
        extra=tuple(extra), progress=progress,
    )  # fmt: skip


def solve(
    lm,
    seed: int,
    candidates: Sequence[int],
    num_timesteps: int = 20,
    num_samples: int = 32,
    *,
    reconstruct_steps: int = 0,
    bias_correction: bool = False,
    registry: LayerRegistry | None = None,
    progress: bool = True,
    method: str = "minmse",
) -> tuple[QParams, dict, dict]:
    """(QParams, settings, info) for a `LoadedModel`.

    `seed` keys everything (calibration set: fold 0, activation subsample: fold 1,
    reconstruction minibatches: fold 2, GPTQ's Hessian rows: fold 3). `method`
    (`METHODS`) rounds the weights after min-MSE. `reconstruct_steps` > 0 runs block
    reconstruction (`reconstruction.py`) on the min-MSE result; `bias_correction`
    (`bias_correction.py`, off by default: on the shipped model it helped
    uniform widths but the W6A6 joint search ended worse with it) is made last,
    for the ranges finally kept."""
    check_method(method, reconstruct_steps)
    registry = registry if registry is not None else lm.layer_registry()
    if lm.prediction != "eps" and (reconstruct_steps or bias_correction):
        raise UserError(
            "reconstruction and bias correction are built for noise-prediction "
            f"models; this one predicts {lm.prediction}: calibrate it with min-MSE "
            "alone (no reconstruction steps, no bias correction)."
        )
    key = jax.random.key(seed)
    qparams, info = calibrate(
        lm, key, candidates, num_timesteps, num_samples, progress, registry=registry
    )
    settings = {
        "num_timesteps": num_timesteps,
        "num_samples": num_samples,
        "seed": seed,
        "stage": rc.STAGE_MIN_MSE,
        "bias_correction": bias_correction,
    }
    seconds = info["seconds"]
    if method != "minmse":
        t0 = time.perf_counter()
        qparams, minfo = with_method(
            lm, qparams, key, method, num_timesteps, num_samples, registry, progress
        )
        seconds += time.perf_counter() - t0
        settings["method"] = method
        info[method] = minfo
    if reconstruct_steps:
        xs, ts = calibration_set(  # the set `calibrate` used (same key)
            lm, jax.random.fold_in(key, 0), num_timesteps, num_samples
        )
        qparams, rinfo = rc.reconstruct(
            lm.model,
            lm.params,
            registry,
            qparams,
            xs,
            ts,
            jax.random.fold_in(key, 2),
            steps=reconstruct_steps,
            progress=progress,
        )
        seconds += rinfo["seconds"]
        kept = sum(r["kept"] == rc.STAGE_RECONSTRUCTION for r in rinfo["fits"])
        settings |= {
            "stage": rc.STAGE_RECONSTRUCTION,
            "reconstruct": {
                k: rinfo[k] for k in ("steps", "lr", "batch_size", "depth", "num_pairs")
            }
            | {"fits": len(rinfo["fits"]), "fits_improved": kept},
        }
        info["reconstruction"] = rinfo
    if bias_correction:
        t0 = time.perf_counter()
        qparams = with_bias_correction(
            lm,
            qparams,
            seed,
            num_timesteps,
            num_samples,
            registry=registry,
            progress=progress,
        )
        seconds += time.perf_counter() - t0
    info["seconds"] = seconds
    return qparams, settings, info
