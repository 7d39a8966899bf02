"""Shared fixtures: tiny shapes, compiled once per session (compile time dominates on CPU)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on JAX's persistent compilation cache; tests keep nothing on disk.
os.environ.setdefault("TMPQ_COMPILATION_CACHE", "0")

import jax  # noqa: E402

# Compile time dominates on CI's 2 cores; the tiny shapes don't need XLA's passes.
jax.config.update("jax_disable_most_optimizations", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tmpq_jax.diffusion.schedules import DiffusionConfig, make_noise_schedule  # noqa: E402
from tmpq_jax.models.unet import UNet, UNetConfig, init_params  # noqa: E402

TINY_UNET = UNetConfig(
    image_size=16,
    channels=1,
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    num_heads=1,
    num_groups=4,
)


@pytest.fixture(scope="session")
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY_UNET


@pytest.fixture(scope="session")
def tiny_params():
    return init_params(TINY_UNET, jax.random.key(1))


@pytest.fixture(scope="session")
def tiny_eps_fn(tiny_params):
    model = UNet(TINY_UNET)
    return lambda x, t: model.apply({"params": tiny_params}, x, t)


@pytest.fixture(scope="session")
def sched():
    return make_noise_schedule(DiffusionConfig())


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """A 64-image 16x16 uint8 dataset as .npz (blobs, so training has signal)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    cy, cx = rng.uniform(4, 12, (2, 64, 1, 1))
    imgs = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, images=imgs, labels=np.zeros(64, np.int32))
    return path


def oracle_eps_fn(x0, sched):
    """The exact noise predictor for data that is the single point x0."""

    def eps_fn(x, t):
        ab = sched.alphas_cumprod[t][:, None, None, None]
        return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)

    return eps_fn
