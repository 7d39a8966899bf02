"""A flow-matching (velocity) model as sampling, calibration and the search take it.

`FlowModel` is the `sampling.LoadedModel` of a model trained by flow matching
(`diffusion/flow.py`), such as the shipped DiT: called as `model(x, t)` or, when
class-conditional, `model(x, t, y)`, with t float in [0, 1] (1 is noise). The
search's integer time genes stand for continuous times (`flow.gene_times`,
resolution `diffusion.num_timesteps`), so the genome, budget and strategies of
integer steps serve it unchanged; only the sampler differs (`search/sampler.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from tmpq_jax.diffusion.flow import check_sampler
from tmpq_jax.diffusion.schedules import DiffusionConfig
from tmpq_jax.errors import UserError
from tmpq_jax.models.dit import DiT, DiTConfig, load_dit
from tmpq_jax.sampling import LoadedModel, _relative

TIME_RESOLUTION = 1000  # time genes per unit time: gene k is t = (k + 1) / 1000


class FlowModel(LoadedModel):
    """A velocity model with params and card. `config` needs `image_size`,
    `channels`, `num_classes` and `null_label` (a `DiTConfig` has them)."""

    prediction = "velocity"

    def __init__(self, config: DiTConfig, params, card: dict, model=None):
        # The diffusion config only sets the time genes' resolution: a flow model
        # has no noise schedule.
        diffusion = DiffusionConfig(num_timesteps=TIME_RESOLUTION)
        model = DiT(config) if model is None else model
        super().__init__(config, diffusion, params, card, model=model)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.config, "num_classes", 0))

    @property
    def null_label(self) -> int:
        return int(self.config.null_label)

    def example_inputs(self, batch: int = 1) -> tuple:
        """(x, t float[, y int]): the inputs of one forward."""
        c = self.config
        x = jax.ShapeDtypeStruct(
            (batch, c.image_size, c.image_size, c.channels), jnp.float32
        )
        t = jax.ShapeDtypeStruct((batch,), jnp.float32)
        if not self.num_classes:
            return x, t
        return x, t, jax.ShapeDtypeStruct((batch,), jnp.int32)

    def eps_fn(self, params):
        check_sampler("ddim", self.prediction)  # refuses: this model is no eps model
        raise AssertionError("unreachable")

    def model_fn(self, params):
        """(x, t[, y]) -> the predicted velocity, from `params`."""
        return lambda x, t, *y: self.model.apply({"params": params}, x, t, *y)

    def with_dtype(self, dtype: str) -> FlowModel:
        if not isinstance(self.config, DiTConfig):
            raise UserError("with_dtype is for the project's DiT.")
        cfg = dataclasses.replace(self.config, dtype=dtype)
        cfg.validate()
        out = FlowModel(cfg, self.params, self.card)
        out.source, out.keep_float = self.source, self.keep_float
        return out


def load_flow_model(path: str | Path) -> FlowModel:
    """An exported DiT (`tmpq train --config configs/fmnist_dit.py`)."""
    cfg, params, card = load_dit(path)
    lm = FlowModel(cfg, params, card)
    lm.source = _relative(Path(path))
    return lm
