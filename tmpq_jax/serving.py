"""Sampling from a genome: read the file, check it against the model and its
calibration, CONVERT the kernels to int8 and SERVE them (`quant/export.py`).

`load_genome_model` does every check at the boundary (one-line `UserError`s, before
anything is compiled); the `ServedModel` it returns is a `sampling.LoadedModel`
whose params are the frozen `QuantizedModel`, so `sampling.sample` runs the int8
model with the genome's timesteps unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from tmpq_jax.checkpoint import CHECKPOINTS_DIR, REPO_ROOT
from tmpq_jax.errors import ArgumentError, UserError
from tmpq_jax.genome_file import Genome, read_genome
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.quant.calibration_io import load_calibration, read_calibration_meta
from tmpq_jax.quant.export import QuantizedModel, convert, serve_apply
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.sampling import LoadedModel, load_model

SHIPPED_CALIBRATION = CHECKPOINTS_DIR / "fmnist_unet_calib"


class ServedModel(LoadedModel):
    """A `LoadedModel` sampling from frozen int8 weights: `params` is a
    `QuantizedModel`, every evaluation goes through `serve_apply`."""

    def __init__(self, lm: LoadedModel, qmodel: QuantizedModel, registry):
        self.registry = registry
        super().__init__(lm.config, lm.diffusion, qmodel, lm.card, model=lm.model)
        self.prediction, self.num_classes = lm.prediction, lm.num_classes

    def eps_fn(self, params):
        if self.prediction != "eps":
            from tmpq_jax.diffusion.flow import check_sampler

            check_sampler("ddim", self.prediction)
        return self.model_fn(params)

    def model_fn(self, params):
        """(x, t, *y) -> the int8 model's output (labels y: a conditional model)."""
        return lambda x, t, *y: serve_apply(
            self.model, params, x, t, *y, registry=self.registry
        )

    def with_dtype(self, dtype: str) -> LoadedModel:
        raise UserError(
            "with_dtype: the int8 model of a genome samples in float32; sample it "
            "without changing its dtype."
        )


def resolve_calibration(
    named: str | None, genome_path: str | os.PathLike, override=None
) -> Path:
    """The calibration directory: `override`, else the one the genome names (as
    given, next to the genome file, or under the repository), else the shipped one."""
    if override is not None:
        return Path(override)
    if named is None:
        return SHIPPED_CALIBRATION
    p = Path(named)
    tries = [p] if p.is_absolute() else [p, Path(genome_path).parent / p, REPO_ROOT / p]
    for t in tries:
        if t.is_dir():
            return t
    raise ArgumentError(
        "calibration",
        f"the genome's calibration {named!r} is not found; pass {{arg}}=DIR.",
    )


def load_genome_model(
    genome_path: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    model: LoadedModel | None = None,
    model_spec: str | None = None,
    pick: float | None = None,
) -> tuple[LoadedModel, Genome]:
    """Reads a genome file, loads the model (the one in hand as `model`, e.g.
    `LoadedModel.from_module`; else `checkpoint` or the factory `model_spec`; else
    the one the genome names, or the shipped one) and the calibration, refuses
    mismatches, and CONVERTs: (ServedModel, Genome); a full-precision genome
    (`space=timesteps_fp`) gets the float model itself. `pick`: a front file's
    point closest to (at or below) these total BitOPs."""
    from tmpq_jax.genome_file import _load_json
    from tmpq_jax.user_model import load_source, resolve_model

    if model is not None:
        lm = model
    elif checkpoint or model_spec:
        lm = resolve_model(checkpoint, model_spec)
    else:
        lm = load_source(_load_json(Path(genome_path)).get("model")) or load_model()
    fp = model_fingerprint(lm.card)
    want = _load_json(Path(genome_path)).get("model_fingerprint")
    if want is not None and want != fp:
        raise ArgumentError(
            "checkpoint",
            f"{genome_path}: searched on model {want}, not this model ({fp}); "
            "pass {arg}=DIR (or {model_spec}=FILE.py:FACTORY) of the model it was "
            "searched on.",
        )
    reg: LayerRegistry = lm.layer_registry()
    genome = read_genome(
        genome_path, reg, num_timesteps=lm.diffusion.num_timesteps, pick=pick
    )
    if genome.meta.get("full_precision"):  # searched timesteps, the float model
        return lm, genome
    calib = resolve_calibration(
        genome.meta.get("calibration"), genome_path, calibration
    )
    cands = read_calibration_meta(calib).get("candidates") or []
    qparams, _ = load_calibration(calib, reg, cands, fp)
    qmodel = convert(lm.params, reg, genome.bits, qparams, genome.candidates)
    return ServedModel(lm, qmodel, reg), genome
