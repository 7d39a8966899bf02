"""The calibration set of a flow (velocity) model, class-conditional or not.

Data-free as for noise-prediction models (`calibration.calibration_set`): the
full-precision model's own Euler trajectories from `num_samples` noises over a
uniform grid of `num_timesteps` steps, every (x_t, t) visited kept. A class-
conditional model samples class-balanced labels, and each x_t is kept twice, with
its label and with the null class: classifier-free guidance runs both branches,
so both are calibrated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tmpq_jax.diffusion.flow import flow_times
from tmpq_jax.diffusion.guidance import balanced_labels


@functools.partial(jax.jit, static_argnums=0)
def _trajectories(model, params, times, x1, labels):
    """x_t and t at every Euler step from x1 (conditional on `labels`, or
    unconditional when None): [N, B, ...], [N, B]."""

    def body(x, tt):
        t, t_next = tt
        tb = jnp.full((x.shape[0],), t)
        args = (x, tb) if labels is None else (x, tb, labels)
        v = model.apply({"params": params}, *args)
        return x + (t_next - t) * v, (x, tb)

    _, (xs, ts) = jax.lax.scan(body, x1, (times[:-1], times[1:]))
    return xs, ts


def flow_calibration_set(lm, key: jax.Array, num_timesteps: int, num_samples: int):
    """(x_t f32[M, H, W, C], t f32[M]) or, class-conditional, (x_t, t, y int32[M])
    with M = 2 N S (each x_t with its label, then with the null class); step-major
    (first the inputs at t = 1)."""
    k_x, k_y = jax.random.split(key)
    x1 = lm.noise(k_x, num_samples)
    labels = None
    if lm.num_classes:
        labels = balanced_labels(k_y, num_samples, lm.num_classes)
    times = jnp.asarray(flow_times(num_timesteps), jnp.float32)
    xs, ts = _trajectories(lm.model, lm.params, times, x1, labels)
    xs, ts = xs.reshape(-1, *xs.shape[2:]), ts.reshape(-1)
    if labels is None:
        return xs, ts
    ys = jnp.tile(labels, num_timesteps)
    null = jnp.full_like(ys, lm.null_label)
    return (
        jnp.concatenate([xs, xs]),
        jnp.concatenate([ts, ts]),
        jnp.concatenate([ys, null]),
    )
