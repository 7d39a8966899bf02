"""The host training loop: progress bar, loss log, orbax checkpoints, resume, export.

The objective follows the config: an `ExperimentConfig` (UNet, DDPM schedule)
trains eps-prediction; a `FlowExperimentConfig` (DiT, `flow` section) trains
velocity-prediction by flow matching. `experiment_config(cd)` builds whichever a
ConfigDict describes (one with a `flow` section is a flow config).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax.checkpoint import TrainCheckpoints, save_model
from tmpq_jax.config import DataConfig, ExperimentConfig, TrainConfig
from tmpq_jax.data import data_fingerprint, load_dataset
from tmpq_jax.diffusion.flow import FlowConfig
from tmpq_jax.diffusion.schedules import make_noise_schedule
from tmpq_jax.errors import UserError, check_keys
from tmpq_jax.models.dit import DiT, DiTConfig
from tmpq_jax.models.unet import UNet, check_channels, count_params
from tmpq_jax.train.step import (
    create_train_state,
    make_flow_train_steps,
    make_train_steps,
)


@dataclasses.dataclass(frozen=True)
class FlowExperimentConfig:
    """A DiT trained by flow matching (configs/fmnist_dit.py)."""

    model: DiTConfig
    flow: FlowConfig
    data: DataConfig
    train: TrainConfig

    @classmethod
    def from_configdict(cls, cd: Any) -> FlowExperimentConfig:
        d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
        check_keys(cls, d, "the flow config")
        for section, klass in (("data", DataConfig), ("train", TrainConfig)):
            check_keys(klass, d.get(section, {}), f"config.{section}")
        return cls(
            model=DiTConfig.from_dict(d.get("model", {})),
            flow=FlowConfig.from_dict(d.get("flow", {})),
            data=DataConfig(**d.get("data", {})),
            train=TrainConfig(**d.get("train", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def flow_default_configdict():
    """The DiT's flow-matching settings at their defaults (`configs/fmnist_dit.py`)."""
    from tmpq_jax.config import configdict_of

    return configdict_of(
        FlowExperimentConfig(DiTConfig(), FlowConfig(), DataConfig(), TrainConfig())
    )


def experiment_config(cd: Any) -> ExperimentConfig | FlowExperimentConfig:
    """The typed config a ConfigDict describes: flow matching when it has a `flow`
    section, else the UNet's eps training."""
    if "flow" in cd:
        return FlowExperimentConfig.from_configdict(cd)
    return ExperimentConfig.from_configdict(cd)


def _labels(data, cfg: FlowExperimentConfig) -> np.ndarray:
    """The training labels of a flow run, checked against the model's label set."""
    k = cfg.model.num_classes
    if k == 0:  # unconditional: a placeholder the step never reads
        return np.zeros(len(data), np.int32)
    if data.labels is None:
        raise UserError(
            f"{cfg.data.name}: no labels, but the DiT is class-conditional "
            f"(num_classes={k}); add `labels` to the data or set "
            "--config.model.num_classes=0."
        )
    labels = np.asarray(data.labels, np.int32)
    if labels.min() < 0 or labels.max() >= k:
        raise UserError(
            f"{cfg.data.name}: labels span {labels.min()}..{labels.max()} but the "
            f"model has {k} classes; set --config.model.num_classes."
        )
    return labels


# Keys that may change between runs of one training: its length, how often it
# saves, and where the (same) data lies.
_NOT_SIGNATURE = {"train": ("num_steps", "ckpt_every"), "data": ("data_dir",)}


def _signature(config_dict: dict) -> dict:
    """What must match for a checkpoint to be resumed."""
    return {
        section: {
            k: v for k, v in keys.items() if k not in _NOT_SIGNATURE.get(section, ())
        }
        for section, keys in config_dict.items()
    }


def _resume_signature(cfg: ExperimentConfig) -> dict:
    return _signature(cfg.to_dict())


def _check_resumable(meta: dict, cfg: ExperimentConfig, workdir: Path) -> None:
    want, have = _resume_signature(cfg), _signature(meta.get("signature", {}))
    if want != have:
        diff = sorted(
            f"{s}.{k}"
            for s in want
            for k in want[s]
            if have.get(s, {}).get(k) != want[s][k]
        )
        raise UserError(
            f"{workdir} holds a checkpoint of a different config ({', '.join(diff)} differ); "
            "use another --workdir or the same config."
        )


def train(
    cfg: ExperimentConfig | FlowExperimentConfig,
    workdir: str | Path,
    progress: bool = True,
) -> dict:
    """Trains (or resumes) to cfg.train.num_steps; exports EMA params to workdir/model."""
    workdir = Path(workdir)
    tc = cfg.train
    data = load_dataset(cfg.data.name, "train", cfg.data.data_dir)
    check_channels(data.images.shape, cfg.model)
    if data.images.shape[1:3] != (cfg.model.image_size,) * 2:
        raise UserError(
            f"data is {data.images.shape[1]}x{data.images.shape[2]} but the model takes "
            f"{cfg.model.image_size}x{cfg.model.image_size}; set --config.model.image_size."
        )
    flow = isinstance(cfg, FlowExperimentConfig)
    if flow:
        model, labels = DiT(cfg.model), jax.device_put(_labels(data, cfg))
    else:
        model, sched = UNet(cfg.model), make_noise_schedule(cfg.diffusion)
    key = jax.random.key(tc.seed)
    k_init, k_train = jax.random.split(key)
    state = create_train_state(k_init, cfg.model, tc)
    ckpts = TrainCheckpoints(workdir / "checkpoints")
    wall = 0.0
    if (latest := ckpts.latest_step()) is not None:
        _check_resumable(ckpts.restore_meta(latest), cfg, workdir)
        state, meta = ckpts.restore(latest, state)
        wall = float(meta.get("wall_s", 0.0))
    images = jax.device_put(data.images)
    if flow:
        flow_steps = make_flow_train_steps(model, cfg.flow, tc)
        train_steps = lambda s, im, k, n: flow_steps(s, im, labels, k, n)
    else:
        train_steps = make_train_steps(model, sched, tc)
    step = int(state.step)
    log_path = workdir / "train_log.jsonl"
    bar = tqdm(
        total=tc.num_steps,
        initial=step,
        disable=not progress,
        desc="train",
        unit="step",
    )
    t0 = time.perf_counter()
    try:
        while step < tc.num_steps:
            n = min(tc.steps_per_call, tc.num_steps - step)
            state, losses = train_steps(state, images, k_train, n)
            step += n
            loss = float(np.mean(np.asarray(losses)))
            bar.update(n)
            bar.set_postfix(loss=f"{loss:.4f}")
            with log_path.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": loss,
                            "wall_s": round(wall + time.perf_counter() - t0, 2),
                        }
                    )
                    + "\n"
                )
            if step % tc.ckpt_every < n or step == tc.num_steps:
                elapsed = wall + time.perf_counter() - t0
                ckpts.save(
                    step,
                    state,
                    {"signature": _resume_signature(cfg), "wall_s": elapsed},
                )
    finally:
        bar.close()
        ckpts.close()
    wall += time.perf_counter() - t0
    card = {
        "kind": "tmpq_jax.DiT velocity-prediction (flow matching), EMA params"
        if flow
        else "tmpq_jax.UNet eps-prediction, EMA params",
        "prediction": "velocity" if flow else "eps",
        "config": cfg.to_dict(),
        "steps": step,
        "params": count_params(state.ema_params),
        "data": cfg.data.name
        if cfg.data.name != "fmnist"
        else "Fashion-MNIST train (60k)",
        # Names the images trained on: a feature net made from other data is
        # refused for this model (metrics.feature_net.check_model_data).
        "data_fingerprint": data_fingerprint(data.images),
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind,
        "train_wall_s_this_run": round(time.perf_counter() - t0, 1),
        "train_wall_s_total": round(wall, 1),
    }
    save_model(workdir / "model", state.ema_params, card)
    return card
