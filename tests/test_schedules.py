import numpy as np
import pytest

from tmpq_jax.diffusion.schedules import (
    DiffusionConfig,
    make_noise_schedule,
    quad_group_bounds,
    quad_timesteps,
    timestep_schedule,
    uniform_timesteps,
)
from tmpq_jax.errors import UserError


def test_quad_groups_match_paper():
    # The TMPQ-DM groups for N=10, T=1000 (../shared/DESIGN.md section 1).
    edges = quad_group_bounds(10, 1000)
    groups = [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    assert groups == [
        (0, 8),
        (9, 38),
        (39, 87),
        (88, 157),
        (158, 245),
        (246, 354),
        (355, 482),
        (483, 631),
        (632, 799),
        (800, 999),
    ]


def test_uniform_and_quad():
    np.testing.assert_array_equal(uniform_timesteps(4, 1000), [0, 250, 500, 750])
    q = quad_timesteps(10)
    assert q[0] == 0 and np.all(np.diff(q) > 0) and q[-1] == 800
    np.testing.assert_array_equal(timestep_schedule("quad", 10), q)


@pytest.mark.parametrize("bad", [0, 1001])
def test_bad_steps(bad):
    with pytest.raises(UserError, match="sampling steps"):
        uniform_timesteps(bad)


def test_unknown_schedule():
    with pytest.raises(UserError, match="unknown schedule"):
        timestep_schedule("cosine", 10)


def test_noise_schedule():
    s = make_noise_schedule(DiffusionConfig())
    ab = np.asarray(s.alphas_cumprod)
    assert ab.shape == (1000,) and np.all(np.diff(ab) < 0)
    # alpha_bar_T for linear betas 1e-4..0.02 is ~4e-5: x_T is essentially noise.
    assert 1e-5 < ab[-1] < 1e-4
