"""Noise schedule, timestep schedules, the DDPM loss and the DDIM / DDPM samplers."""

from tmpq_jax.diffusion.samplers import ddim_sample, ddpm_sample
from tmpq_jax.diffusion.schedules import (
    DiffusionConfig,
    NoiseSchedule,
    make_noise_schedule,
    quad_group_bounds,
    quad_timesteps,
    timestep_schedule,
    uniform_timesteps,
)

__all__ = [
    "DiffusionConfig",
    "NoiseSchedule",
    "ddim_sample",
    "ddpm_sample",
    "make_noise_schedule",
    "quad_group_bounds",
    "quad_timesteps",
    "timestep_schedule",
    "uniform_timesteps",
]
