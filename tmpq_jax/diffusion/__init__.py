"""Noise schedule, timestep schedules, the DDPM loss and the DDIM / DDPM samplers;
flow matching (objective, time grids, Euler / Heun) and classifier-free guidance."""

from tmpq_jax.diffusion.flow import (
    FlowConfig,
    check_sampler,
    euler_sample,
    flow_group_bounds,
    flow_loss,
    flow_sample,
    flow_times,
    grid_from_times,
    heun_sample,
    prediction_of,
    shift_time,
)
from tmpq_jax.diffusion.guidance import balanced_labels, guided_sample, guided_velocity
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
    "FlowConfig",
    "NoiseSchedule",
    "balanced_labels",
    "check_sampler",
    "ddim_sample",
    "ddpm_sample",
    "euler_sample",
    "flow_group_bounds",
    "flow_loss",
    "flow_sample",
    "flow_times",
    "grid_from_times",
    "guided_sample",
    "guided_velocity",
    "heun_sample",
    "prediction_of",
    "shift_time",
    "make_noise_schedule",
    "quad_group_bounds",
    "quad_timesteps",
    "timestep_schedule",
    "uniform_timesteps",
]
