"""Sampler identities: oracle recovery, traced == static schedules, vmap, keys."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import oracle_eps_fn

from tmpq_jax.diffusion.samplers import ddim_sample, ddpm_sample
from tmpq_jax.diffusion.schedules import quad_timesteps, uniform_timesteps


def _x0_and_noise():
    x0 = jnp.linspace(-0.9, 0.9, 2 * 16 * 16).reshape(2, 16, 16, 1)
    return x0, jax.random.normal(jax.random.key(3), x0.shape)


def test_ddim_oracle_recovers_data(sched, key):
    # With the exact eps of a point mass, DDIM's x0-prediction is exact at every
    # step, so any schedule and any eta land on x0.
    x0, x_T = _x0_and_noise()
    eps_fn = oracle_eps_fn(x0, sched)
    for ts in (quad_timesteps(10), uniform_timesteps(3), np.array([999])):
        for eta in (0.0, 1.0):
            out = ddim_sample(key, eps_fn, x_T, ts, sched, eta)
            np.testing.assert_allclose(out, x0, atol=2e-3)


def test_ddpm_oracle_recovers_data(sched, key):
    x0, x_T = _x0_and_noise()
    out = ddpm_sample(key, oracle_eps_fn(x0, sched), x_T, sched)
    np.testing.assert_allclose(out, x0, atol=2e-3)


def test_ddim_one_step_formula(sched, key):
    # A single step from t: x_{-1} = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t).
    x_T = jax.random.normal(key, (1, 4, 4, 1))
    eps = lambda x, t: 0.5 * x
    out = ddim_sample(key, eps, x_T, np.array([500]), sched)
    ab = sched.alphas_cumprod[500]
    np.testing.assert_allclose(
        out, (x_T - jnp.sqrt(1 - ab) * 0.5 * x_T) / jnp.sqrt(ab), rtol=1e-5
    )


def test_traced_schedule_equals_python_list(tiny_eps_fn, sched, key):
    x_T = jax.random.normal(key, (2, 16, 16, 1))
    ts_list = [int(t) for t in quad_timesteps(4)]
    static = jax.jit(lambda x: ddim_sample(key, tiny_eps_fn, x, ts_list, sched))(x_T)
    traced_fn = jax.jit(lambda x, ts: ddim_sample(key, tiny_eps_fn, x, ts, sched))
    traced = traced_fn(x_T, jnp.asarray(ts_list))
    np.testing.assert_allclose(traced, static, rtol=1e-5, atol=1e-5)
    # A different schedule through the same compiled function gives different samples.
    other = traced_fn(x_T, jnp.asarray(uniform_timesteps(4)))
    assert traced_fn._cache_size() == 1
    assert float(jnp.max(jnp.abs(other - traced))) > 1e-3


def test_vmap_over_schedules_equals_each_alone(tiny_eps_fn, sched, key):
    x_T = jax.random.normal(key, (2, 16, 16, 1))
    scheds = jnp.stack(
        [jnp.asarray(quad_timesteps(4)), jnp.asarray(uniform_timesteps(4))]
    )
    one = jax.jit(lambda ts, eta: ddim_sample(key, tiny_eps_fn, x_T, ts, sched, eta))
    both = jax.jit(jax.vmap(one, in_axes=(0, None)))
    for eta in (0.0, 0.5):
        batched = both(scheds, eta)
        for i in range(2):
            np.testing.assert_allclose(
                batched[i], one(scheds[i], eta), rtol=1e-4, atol=1e-4
            )


def test_same_key_same_samples(tiny_eps_fn, sched):
    x_T = jax.random.normal(jax.random.key(5), (2, 16, 16, 1))
    ts = jnp.asarray(uniform_timesteps(4))
    run = jax.jit(lambda k: ddim_sample(k, tiny_eps_fn, x_T, ts, sched, 1.0))
    a, b = run(jax.random.key(7)), run(jax.random.key(7))
    c = run(jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_ddim_repeated_timesteps_are_no_ops(sched, key):
    # A 3-step schedule padded with repeats of its last step to length 6 samples
    # exactly like the 3-step one (how a search over the step count stays one
    # compiled sampler); the eps model is non-trivial so a real extra step would show.
    x_T = jax.random.normal(key, (2, 4, 4, 1))
    eps = lambda x, t: jnp.tanh(x) * (t[:, None, None, None] / 1000.0)
    short = ddim_sample(key, eps, x_T, np.array([10, 300, 700]), sched)
    padded = ddim_sample(key, eps, x_T, np.array([10, 300, 700, 700, 700, 700]), sched)
    np.testing.assert_array_equal(short, padded)
    longer = ddim_sample(key, eps, x_T, np.array([10, 300, 500, 700]), sched)
    assert not np.allclose(short, longer)
