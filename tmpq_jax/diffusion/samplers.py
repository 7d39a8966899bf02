"""DDIM and DDPM ancestral samplers as `lax.scan` over an array of timesteps.

`timesteps` is an int array (ascending, t_1 < ... < t_N) that may be a traced value:
one compiled sampler serves every schedule of the same length, and `jax.vmap`
runs several schedules at once. `eps_fn(x, t)` is the model, t of shape [B].
A repeated timestep (t_i == t_{i+1}) is an exact no-op step: a schedule of n < N
distinct steps padded with repeats of its last one samples like the n-step schedule,
which is how a search over the number of steps keeps one compiled sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tmpq_jax.diffusion.schedules import NoiseSchedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _alpha_bar(sched: NoiseSchedule, t: jax.Array) -> jax.Array:
    # t = -1 stands for "before the first step": alpha_bar = 1 (clean data).
    return jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def ddim_step(x, eps, ab_t, ab_prev, eta, noise):
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12)."""
    x0 = (x - jnp.sqrt(1.0 - ab_t) * eps) / jnp.sqrt(ab_t)
    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
    dir_xt = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(ab_prev) * x0 + dir_xt + sigma * noise


def ddim_sample(
    key: jax.Array,
    eps_fn: EpsFn,
    x_T: jax.Array,
    timesteps: jax.Array,
    sched: NoiseSchedule,
    eta: float | jax.Array = 0.0,
) -> jax.Array:
    """Runs DDIM from x_T over `timesteps` (ascending). Returns x_0 (unclipped).

    `key` is used only when eta > 0 (fresh noise per step from fold_in(key, i)).
    """
    timesteps = jnp.asarray(timesteps, jnp.int32)
    t_seq = timesteps[::-1]
    t_prev_seq = jnp.concatenate([jnp.array([-1], jnp.int32), timesteps[:-1]])[::-1]
    idx = jnp.arange(t_seq.shape[0])

    def body(x, inp):
        t, t_prev, i = inp
        eps = eps_fn(x, jnp.full((x.shape[0],), t))
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x_prev = ddim_step(
            x, eps, _alpha_bar(sched, t), _alpha_bar(sched, t_prev), eta, noise
        )
        return jnp.where(t == t_prev, x, x_prev), None

    x0, _ = jax.lax.scan(body, x_T, (t_seq, t_prev_seq, idx))
    return x0


def ddpm_sample(
    key: jax.Array, eps_fn: EpsFn, x_T: jax.Array, sched: NoiseSchedule
) -> jax.Array:
    """DDPM ancestral sampling over all T steps, posterior variance beta_tilde."""
    num_t = sched.num_timesteps
    ab = sched.alphas_cumprod
    ab_prev = jnp.concatenate([jnp.ones((1,)), ab[:-1]])
    var = sched.betas * (1.0 - ab_prev) / (1.0 - ab)

    def body(x, t):
        eps = eps_fn(x, jnp.full((x.shape[0],), t))
        mean = (x - sched.betas[t] / jnp.sqrt(1.0 - ab[t]) * eps) / jnp.sqrt(
            1.0 - sched.betas[t]
        )
        noise = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
        return mean + jnp.where(t > 0, jnp.sqrt(var[t]), 0.0) * noise, None

    x0, _ = jax.lax.scan(body, x_T, jnp.arange(num_t - 1, -1, -1))
    return x0
