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
from tmpq_jax.errors import UserError
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

    def eps_fn(self, params):
        return lambda x, t: serve_apply(
            self.model, params, x, t, registry=self.registry
        )

    def with_dtype(self, dtype: str) -> LoadedModel:
        raise UserError(
            "the int8 model samples in float32; leave out --dtype with --genome."
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
    raise UserError(
        f"the genome's calibration {named!r} is not found; pass --calibration DIR."
    )


def load_genome_model(
    genome_path: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    model: LoadedModel | None = None,
) -> tuple[ServedModel, Genome]:
    """Reads a genome file, loads the model (default: the shipped one; `model`: one
    in hand, e.g. `LoadedModel.from_module`) and the calibration, refuses
    mismatches, and CONVERTs: (ServedModel, Genome)."""
    lm = model if model is not None else load_model(checkpoint)
    reg: LayerRegistry = lm.layer_registry()
    genome = read_genome(genome_path, reg, num_timesteps=lm.diffusion.num_timesteps)
    fp = model_fingerprint(lm.card)
    want = genome.meta.get("model_fingerprint")
    if want is not None and want != fp:
        raise UserError(
            f"{genome_path}: searched on model {want}, not this model ({fp}); "
            "use the --checkpoint it was searched on."
        )
    calib = resolve_calibration(
        genome.meta.get("calibration"), genome_path, calibration
    )
    cands = read_calibration_meta(calib).get("candidates") or []
    qparams, _ = load_calibration(calib, reg, cands, fp)
    qmodel = convert(lm.params, reg, genome.bits, qparams, genome.candidates)
    return ServedModel(lm, qmodel, reg), genome
