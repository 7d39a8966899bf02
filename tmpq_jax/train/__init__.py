"""DDPM training of the UNet: jitted multi-step updates, EMA, resumable checkpoints."""

from tmpq_jax.train.loop import train
from tmpq_jax.train.step import TrainState, create_train_state, make_train_steps

__all__ = ["TrainState", "create_train_state", "make_train_steps", "train"]
