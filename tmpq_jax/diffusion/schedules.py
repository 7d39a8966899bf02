"""The forward-process noise schedule and the sampling timestep schedules.

Linear betas over T = 1000 steps (DDPM). Sampling schedules are int arrays of
timesteps in *ascending* order, t_1 < ... < t_N, as DDIM (arXiv 2010.02502) builds
them: `uniform` is range(0, T, T // N); `quad` is int(linspace(0, sqrt(0.8 T), N)^2).
`quad_group_bounds` gives the non-uniform groups of TMPQ-DM (arXiv 2404.09532),
one sampled timestep per group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tmpq_jax.errors import ArgumentError, UserError


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@struct.dataclass
class NoiseSchedule:
    betas: jax.Array  # [T]
    alphas_cumprod: jax.Array  # [T], alpha_bar_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_noise_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    # float64 in numpy, then float32: the cumulative product stays accurate.
    betas = np.linspace(
        cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=np.float64
    )
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32)
    )


def _check_steps(num_steps: int, num_timesteps: int) -> None:
    if not 1 <= num_steps <= num_timesteps:
        raise ArgumentError(
            "num_steps",
            f"{{arg}}={num_steps}: use 1 to {num_timesteps} sampling steps.",
        )


def uniform_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    _check_steps(num_steps, num_timesteps)
    return np.arange(0, num_timesteps, num_timesteps // num_steps)[:num_steps].astype(
        np.int32
    )


def quad_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    _check_steps(num_steps, num_timesteps)
    ts = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int32)
    if len(np.unique(ts)) != num_steps:
        raise UserError(
            f"quad schedule with {num_steps} steps repeats timesteps; "
            "use the uniform schedule or fewer steps."
        )
    return ts


def quad_group_bounds(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Group edges [0, b_1, ..., b_{N-1}, T]: group i is [edges[i], edges[i+1])."""
    return np.concatenate(
        [quad_timesteps(num_steps, num_timesteps), [num_timesteps]]
    ).astype(np.int32)


SCHEDULES = {"uniform": uniform_timesteps, "quad": quad_timesteps}


def timestep_schedule(
    name: str, num_steps: int, num_timesteps: int = 1000
) -> np.ndarray:
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; use one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](num_steps, num_timesteps)
