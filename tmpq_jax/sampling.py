"""Sampling from a trained model: batched, jitted once per (batch, steps) shape.

The timestep array is an argument of the jitted sampler, not a constant, so
switching schedules of the same length never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax.checkpoint import SHIPPED_MODEL, load_params, read_card
from tmpq_jax.diffusion.samplers import ddim_sample, ddpm_sample
from tmpq_jax.diffusion.schedules import (
    DiffusionConfig,
    NoiseSchedule,
    make_noise_schedule,
)
from tmpq_jax.errors import ArgumentError, UserError
from tmpq_jax.models.unet import UNet, UNetConfig, init_params


@dataclasses.dataclass(frozen=True)
class ImageShape:
    """The `config` of a model that is not the project's UNet: its image size."""

    image_size: int
    channels: int = 1


class LoadedModel:
    """A UNet with params and its noise schedule, as read from an exported checkpoint;
    or any linen epsilon model (`LoadedModel.from_module`)."""

    def __init__(
        self,
        config: UNetConfig | ImageShape,
        diffusion: DiffusionConfig,
        params,
        card: dict,
        model: nn.Module | None = None,
    ):
        self.config, self.diffusion, self.params, self.card = (
            config,
            diffusion,
            params,
            card,
        )
        self.model = UNet(config) if model is None else model
        # Where it came from (a checkpoint dir or "factory:SPEC"), for genome files;
        # which of its ops may stay in float (`quant.coverage.check_coverage`).
        self.source: str | None = None
        self.keep_float: tuple[str, ...] = ()
        self.sched: NoiseSchedule = make_noise_schedule(diffusion)
        # Jitted once per model; timesteps and eta are traced, batch is static.
        self.ddim_batch = jax.jit(self._ddim_batch, static_argnums=3)
        self.ddpm_batch = jax.jit(self._ddpm_batch, static_argnums=2)

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        params,
        image_size: int,
        channels: int = 1,
        diffusion: DiffusionConfig | None = None,
        name: str | None = None,
    ) -> LoadedModel:
        """Your own linen model, `model.apply({'params': params}, x, t)` -> the
        predicted noise for x f32[B, H, W, C] in [-1, 1] and t int32[B], trained on
        the `diffusion` schedule (default: `DiffusionConfig()`, DDPM's linear one).
        Sampling, calibration and the search take it as they take the shipped UNet.
        Its card holds a hash of `params`, so calibrations and search checkpoints
        made for other weights are never reused."""
        from tmpq_jax.diffusion.flow import check_sampler
        from tmpq_jax.metrics.feature_net import params_fingerprint

        check_sampler("ddim", getattr(model, "config", "eps"))  # eps models only

        diffusion = diffusion if diffusion is not None else DiffusionConfig()
        shape = ImageShape(int(image_size), int(channels))
        card = {
            "name": name or type(model).__name__,
            "module": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": {
                "model": dataclasses.asdict(shape),
                "diffusion": dataclasses.asdict(diffusion),
            },
            "params_fingerprint": params_fingerprint(params),
        }
        return cls(shape, diffusion, params, card, model=model)

    # What the model predicts and takes: a noise-prediction model of (x, t int).
    # `flow_model.FlowModel` overrides these for velocity models with labels.
    prediction: str = "eps"
    num_classes: int = 0  # > 0: class-conditional, called as model(x, t, y)

    def example_inputs(self, batch: int = 1) -> tuple:
        """Abstract inputs of one forward: (x, t) here."""
        c = self.config
        x = jax.ShapeDtypeStruct(
            (batch, c.image_size, c.image_size, c.channels), jnp.float32
        )
        return x, jax.ShapeDtypeStruct((batch,), jnp.int32)

    def layer_registry(self, check: bool = True):
        """The model's quantizable ops (`quant.LayerRegistry`), traced at batch 1;
        `check`: refuse a model whose every matmul/conv is not quantized, except
        those named in `keep_float`."""
        from tmpq_jax.quant.coverage import check_coverage
        from tmpq_jax.quant.registry import build_registry

        reg = build_registry(
            self.model, {"params": self.params}, *self.example_inputs(1)
        )
        if check:
            check_coverage(reg, self.keep_float)
        return reg

    def noise(self, key: jax.Array, batch: int) -> jax.Array:
        c = self.config
        return jax.random.normal(key, (batch, c.image_size, c.image_size, c.channels))

    def _ddim_batch(self, params, key, timesteps, batch, eta):
        k_x, k_s = jax.random.split(key)
        return ddim_sample(
            k_s, self.eps_fn(params), self.noise(k_x, batch), timesteps, self.sched, eta
        )

    def _ddpm_batch(self, params, key, batch):
        k_x, k_s = jax.random.split(key)
        return ddpm_sample(k_s, self.eps_fn(params), self.noise(k_x, batch), self.sched)

    def eps_fn(self, params):
        return lambda x, t: self.model.apply({"params": params}, x, t)

    def model_fn(self, params):
        """The model as a function of its inputs (`example_inputs`)."""
        return self.eps_fn(params)

    def with_dtype(self, dtype: str) -> LoadedModel:
        if not isinstance(self.config, UNetConfig):
            raise UserError(
                "with_dtype is for the project's UNet; set your own model's compute "
                "dtype in its module."
            )
        cfg = dataclasses.replace(self.config, dtype=dtype)
        cfg.validate()
        lm = LoadedModel(cfg, self.diffusion, self.params, self.card)
        lm.source, lm.keep_float = self.source, self.keep_float
        return lm


def load_model(path: str | Path | None = None) -> LoadedModel:
    """Loads an exported model (default: the shipped Fashion-MNIST UNet); a
    velocity-prediction (flow) one comes back as a `flow_model.FlowModel`."""
    from tmpq_jax.diffusion.flow import prediction_of

    path = Path(path) if path is not None else SHIPPED_MODEL
    card = read_card(path)
    if prediction_of(card) == "velocity":
        from tmpq_jax.flow_model import load_flow_model

        return load_flow_model(path)
    try:
        cfg = UNetConfig.from_dict(card["config"]["model"])
        diff = DiffusionConfig(**card["config"]["diffusion"])
    except (KeyError, TypeError) as e:
        raise UserError(
            f"{path}/card.json: missing or bad model config ({e}); re-export it."
        ) from None
    like = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    lm = LoadedModel(cfg, diff, load_params(path, like), card)
    lm.source = _relative(path)
    return lm


def _relative(path: Path) -> str:
    from tmpq_jax.checkpoint import REPO_ROOT

    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(path).resolve())


def sample(
    key: jax.Array,
    lm: LoadedModel,
    num: int,
    timesteps: Sequence[int] | np.ndarray | None,
    eta: float = 0.0,
    batch_size: int = 500,
    progress: bool = False,
) -> np.ndarray:
    """`num` images in [-1, 1], float32 [num, H, W, C]. timesteps=None: DDPM (all T)."""
    if num < 1:
        raise ArgumentError("num", f"{{arg}}={num}: ask for at least one image.")
    batch = min(batch_size, num)
    n_batches = -(-num // batch)
    out = []
    for i in tqdm(range(n_batches), disable=not progress, desc="sample", unit="batch"):
        k = jax.random.fold_in(key, i)
        if timesteps is None:
            x = lm.ddpm_batch(lm.params, k, batch)
        else:
            x = lm.ddim_batch(
                lm.params, k, jnp.asarray(timesteps, jnp.int32), batch, eta
            )
        out.append(np.asarray(x))
    return np.clip(np.concatenate(out)[:num], -1.0, 1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round((np.asarray(images) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
