"""Flow matching: ODE samplers, time grids and groups, CFG, and the bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    interpolate,
    shift_time,
)
from tmpq_jax.diffusion.guidance import (
    balanced_labels,
    guided_sample,
    guided_velocity,
)
from tmpq_jax.errors import UserError
from tmpq_jax.models.dit import DiT, DiTConfig, init_params
from tmpq_jax.models.unet import UNetConfig

TINY_DIT = DiTConfig(
    image_size=8,
    channels=1,
    patch=2,
    width=32,
    depth=1,
    heads=2,
    num_classes=3,
    time_embed_dim=32,
)


@pytest.fixture(scope="module")
def dit():
    """A tiny DiT with random (not adaLN-Zero) params, so every path is live."""

    @jax.jit  # one program: eager op-by-op dispatch is slow on CPU
    def perturbed(key):
        leaves, tree = jax.tree.flatten(init_params(TINY_DIT, key))
        keys = jax.random.split(key, len(leaves))
        noise = [
            0.1 * jax.random.normal(k, p.shape)
            for p, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(
            tree, [p + n for p, n in zip(leaves, noise, strict=True)]
        )

    params, model = perturbed(jax.random.key(0)), DiT(TINY_DIT)
    return jax.jit(lambda x, t, y=None: model.apply({"params": params}, x, t, y))


def _nonlinear_v(x, t):
    return jnp.tanh(x) * (1.0 + t[:, None, None, None]) - 0.3 * x


def test_euler_equals_python_loop(key):
    x1 = jax.random.normal(key, (2, 4, 4, 1))
    times = flow_times(5, shift=3.0)
    out = jax.jit(euler_sample, static_argnums=0)(_nonlinear_v, x1, times)
    x = np.asarray(x1, np.float64)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        v = np.tanh(x) * (1.0 + float(t)) - 0.3 * x
        x = x + (float(t_next) - float(t)) * v
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


def test_heun_is_second_order_euler_first():
    # dx/dt = lam x from t = 1 to 0: x(0) = x(1) exp(-lam).
    lam, x1 = 1.5, jnp.ones((1, 1, 1, 1))
    v = lambda x, t: lam * x
    exact = np.exp(-lam)
    err = {
        name: [
            abs(float(fn(v, x1, flow_times(n))[0, 0, 0, 0]) - exact) for n in (8, 16)
        ]
        for name, fn in (("euler", euler_sample), ("heun", heun_sample))
    }
    assert 3.6 < err["heun"][0] / err["heun"][1] < 4.4
    assert 1.8 < err["euler"][0] / err["euler"][1] < 2.2


def test_euler_with_exact_velocity_recovers_point_mass(key):
    # For data that is the single point x0 the flow paths are straight lines, so
    # Euler is exact on any grid: v(x, t) = (x - x0) / t.
    x0 = jnp.linspace(-0.9, 0.9, 16).reshape(1, 4, 4, 1)
    v = lambda x, t: (x - x0) / t[:, None, None, None]
    x1 = jax.random.normal(key, x0.shape)
    for times in (flow_times(1), flow_times(7, shift=3.0)):
        np.testing.assert_allclose(euler_sample(v, x1, times), x0, atol=1e-5)


def test_repeated_times_are_no_ops_and_grid_is_traced(key):
    x1 = jax.random.normal(key, (2, 4, 4, 1))
    run = jax.jit(lambda ts: heun_sample(_nonlinear_v, x1, ts))
    short = run(jnp.array([1.0, 0.6, 0.2, 0.0]))
    padded = run(jnp.array([1.0, 0.6, 0.2, 0.2, 0.2, 0.0]))  # another length
    np.testing.assert_array_equal(short, padded)
    other = run(jnp.array([1.0, 0.5, 0.1, 0.0]))  # same length: no recompile
    assert run._cache_size() == 2
    assert float(jnp.max(jnp.abs(other - short))) > 1e-3


def test_shift_grid_and_groups():
    np.testing.assert_allclose(flow_times(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    edges = flow_group_bounds(6, shift=3.0)
    assert edges[0] == 0.0 and edges[-1] == 1.0 and np.all(np.diff(edges) > 0)
    # shift > 1 puts more of the grid near t = 1 (noise)
    assert np.sum(edges[1:-1] > 0.5) > np.sum(edges[1:-1] < 0.5)
    # the default genome (each group's upper edge) gives the shifted grid exactly
    default = edges[1:]  # one time per group, in group order
    grid = grid_from_times(jax.random.permutation(jax.random.key(0), default))
    np.testing.assert_array_equal(grid, flow_times(6, shift=3.0))
    with pytest.raises(UserError, match="shift"):
        flow_group_bounds(4, shift=0.0)


def test_flow_loss_objective(key):
    # A model that returns the true velocity has zero loss.
    x0 = jax.random.normal(key, (4, 4, 4, 1))

    class Oracle:
        # knows x0 and the noise only through x_t and t: v = (x_t - x0) / t
        def apply(self, _, x_t, t):
            return (x_t - x0) / t[:, None, None, None]

    loss = flow_loss({}, Oracle(), FlowConfig(), x0, None, key)
    assert float(loss) < 1e-8
    x_t = interpolate(x0, jnp.ones_like(x0), jnp.full((4,), 0.25))
    np.testing.assert_allclose(x_t, 0.75 * x0 + 0.25, rtol=1e-6)


def test_label_dropout_rate(key):
    seen = []

    class Spy:
        def apply(self, _, x_t, t, y):
            seen.append(y)
            return x_t

    labels = jnp.zeros((20_000,), jnp.int32)
    x0 = jnp.zeros((20_000, 1, 1, 1))
    flow_loss({}, Spy(), FlowConfig(label_dropout=0.1), x0, labels, key, 7)
    frac = float(jnp.mean(seen[0] == 7))
    assert 0.09 < frac < 0.11 and set(np.unique(seen[0])) == {0, 7}


def test_cfg_scale_one_is_conditional_zero_is_null(dit, key):
    x = jax.random.normal(key, (3, 8, 8, 1))
    t, y = jnp.array([0.9, 0.5, 0.1]), jnp.array([0, 2, 1])
    cond, null = dit(x, t, y), dit(x, t, jnp.full((3,), TINY_DIT.null_label))
    assert float(jnp.max(jnp.abs(cond - null))) > 1e-3  # the labels matter
    np.testing.assert_array_equal(dit(x, t), null)  # no labels: the null class
    np.testing.assert_allclose(
        guided_velocity(dit, y, TINY_DIT.null_label, 1.0)(x, t), cond, atol=1e-5
    )
    np.testing.assert_allclose(
        guided_velocity(dit, y, TINY_DIT.null_label, 0.0)(x, t), null, atol=1e-5
    )


def test_cfg_one_forward_and_traced_scale_compiles_once(dit, key):
    traces, batches = [], []

    def model_fn(x, t, y):
        batches.append(x.shape[0])
        return dit(x, t, y)

    labels = balanced_labels(key, 4, TINY_DIT.num_classes)

    @jax.jit
    def run(scale):
        traces.append(1)  # Python side effect: runs once per trace
        return guided_sample(
            key, model_fn, TINY_DIT, flow_times(2), labels=labels, guidance_scale=scale
        )

    outs = [run(s) for s in (1.0, 2.5, 4.0)]
    assert len(traces) == 1
    assert batches == [8]  # conditional and null batch in one forward of 2B
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-4
    # scale 1 equals sampling the conditional model without guidance
    plain = guided_sample(key, dit, TINY_DIT, flow_times(2), labels=labels)
    np.testing.assert_allclose(outs[0], plain, atol=1e-4)


def test_balanced_labels(key):
    labels = np.asarray(balanced_labels(key, 23, 5))
    counts = np.bincount(labels, minlength=5)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(labels, balanced_labels(key, 23, 5))
    assert not np.array_equal(labels, balanced_labels(jax.random.key(9), 23, 5))


def test_bad_inputs(dit, key):
    ts = flow_times(2)
    with pytest.raises(UserError, match="class 3 is outside"):
        guided_sample(key, dit, TINY_DIT, ts, labels=np.array([0, 3]))
    with pytest.raises(UserError, match="class -1 is outside"):
        guided_sample(key, dit, TINY_DIT, ts, labels=[-1], guidance_scale=2.0)
    uncond = dataclasses.replace(TINY_DIT, num_classes=0)
    with pytest.raises(UserError, match="unconditional"):
        guided_sample(key, dit, uncond, ts, num=2, guidance_scale=2.0)
    with pytest.raises(UserError, match="needs a velocity-prediction model"):
        flow_sample(lambda x, t: x, jnp.zeros((1, 2, 2, 1)), ts, "heun", UNetConfig())
    with pytest.raises(UserError, match="needs a eps-prediction model"):
        check_sampler("ddim", TINY_DIT)
    with pytest.raises(UserError, match="needs a eps-prediction model"):
        check_sampler("ddpm", {"prediction": "velocity"})  # an exported card
    check_sampler("ddim", UNetConfig())
    check_sampler("euler", {"config": {"model": {"prediction": "velocity"}}})
    with pytest.raises(UserError, match="unknown sampler"):
        check_sampler("rk4", TINY_DIT)
