"""The host training loop: progress bar, loss log, orbax checkpoints, resume, export."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax.checkpoint import TrainCheckpoints, save_model
from tmpq_jax.config import ExperimentConfig
from tmpq_jax.data import load_dataset
from tmpq_jax.diffusion.schedules import make_noise_schedule
from tmpq_jax.errors import UserError
from tmpq_jax.models.unet import UNet, check_channels, count_params
from tmpq_jax.train.step import create_train_state, make_train_steps

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


def train(cfg: ExperimentConfig, workdir: str | Path, progress: bool = True) -> dict:
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
        "kind": "tmpq_jax.UNet eps-prediction, EMA params",
        "config": cfg.to_dict(),
        "steps": step,
        "params": count_params(state.ema_params),
        "data": cfg.data.name
        if cfg.data.name != "fmnist"
        else "Fashion-MNIST train (60k)",
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind,
        "train_wall_s_this_run": round(time.perf_counter() - t0, 1),
        "train_wall_s_total": round(wall, 1),
    }
    save_model(workdir / "model", state.ema_params, card)
    return card
