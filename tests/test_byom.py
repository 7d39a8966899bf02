"""A model defined outside the library, through the public entry points the second
notebook uses (`LoadedModel.from_module`, `prepare_model`), and their refusals. The
whole path, search included, runs in tests/test_notebooks.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from tmpq_jax.diffusion import DiffusionConfig
from tmpq_jax.errors import UserError
from tmpq_jax.quant import unet_registry
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.sampling import LoadedModel
from tmpq_jax.search import SearchConfig, SearchRunConfig, prepare_model


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = h + nn.Dense(4, name="temb")(t[:, None].astype(jnp.float32))[:, None, None]
        return nn.Conv(x.shape[-1], (3, 3), name="out")(nn.swish(h))


@pytest.fixture(scope="module")
def toy():
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = Toy().init(jax.random.key(0), x, t)["params"]
    return LoadedModel.from_module(Toy(), params, image_size=8), params


def test_from_module_traces_its_layers_and_hashes_its_params(toy):
    lm, params = toy
    assert lm.layer_registry().names == ("conv", "temb", "out")
    assert lm.noise(jax.random.key(1), 2).shape == (2, 8, 8, 1)
    assert lm.card["name"] == "Toy" and lm.diffusion.num_timesteps == 1000
    other = LoadedModel.from_module(
        Toy(), jax.tree.map(lambda p: p + 1, params), image_size=8
    )
    assert model_fingerprint(other.card) != model_fingerprint(lm.card)
    with pytest.raises(UserError, match="UNet"):
        lm.with_dtype("bfloat16")


def test_prepare_model_refuses_images_the_feature_net_does_not_take(toy, tmp_path):
    lm, _ = toy
    run = SearchRunConfig(search=SearchConfig(num_steps=2, budget_steps=2))
    with pytest.raises(UserError, match="makes 8x8x1 images .* takes 28x28x1"):
        prepare_model(run, lm, tmp_path)
    assert not (tmp_path / "calibration").exists()  # refused before calibrating


def test_the_unet_registry_is_the_traced_one(tiny_cfg, tiny_params):
    """`layer_registry()`, which calibration, the search and serving now call, lists
    the project's UNet exactly as `unet_registry` does."""
    lm = LoadedModel(tiny_cfg, DiffusionConfig(), tiny_params, {"name": "tiny"})
    assert lm.layer_registry() == unet_registry(tiny_cfg)
