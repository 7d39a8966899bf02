import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.errors import UserError
from tmpq_jax.models import Conv, Dense, MatMul, UNet, UNetConfig, count_params


def test_forward_shape_and_time_dependence(tiny_cfg, tiny_eps_fn, key):
    x = jax.random.normal(key, (3, 16, 16, 1))
    a = tiny_eps_fn(x, jnp.array([10, 10, 10]))
    b = tiny_eps_fn(x, jnp.array([900, 900, 900]))
    assert a.shape == x.shape and a.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_config_file_builds_the_shipped_model():
    """configs/fmnist.py describes the architecture of the committed checkpoint."""
    from tmpq_jax.checkpoint import SHIPPED_MODEL, read_card
    from tmpq_jax.config import ExperimentConfig, load_config

    card = read_card(SHIPPED_MODEL)
    cfg = ExperimentConfig.from_configdict(load_config("configs/fmnist.py")).model
    assert UNetConfig.from_dict(card["config"]["model"]) == cfg
    shapes = jax.eval_shape(
        lambda: UNet(cfg).init(
            jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32)
        )
    )
    assert count_params(shapes) == card["params"]


def test_every_matmul_goes_through_the_injection_point(tiny_cfg, tiny_params, key):
    """Intercepting Conv/Dense/MatMul and zeroing their outputs zeroes the model."""
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if (
            isinstance(context.module, Conv | Dense | MatMul)
            and context.method_name == "__call__"
        ):
            seen.append((type(context.module).__name__, context.module.path))
            return jnp.zeros_like(next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)

    x = jax.random.normal(key, (1, 16, 16, 1))
    with nn.intercept_methods(interceptor):
        out = UNet(tiny_cfg).apply({"params": tiny_params}, x, jnp.array([3]))
    np.testing.assert_array_equal(out, 0.0)
    kinds = {k for k, _ in seen}
    assert kinds == {"Conv", "Dense", "MatMul"}
    # One interception per parameterised layer (each is called once) + 2 per attention.
    n_param_layers = sum(
        1
        for p in jax.tree_util.tree_leaves_with_path(tiny_params)
        if p[0][-1].key == "kernel"
    )
    n_attn = 2  # down_1 at 8x8 ... see attn_resolutions; counted from paths below
    n_attn = len({path[:-1] for k, path in seen if k == "MatMul"})
    assert len(seen) == n_param_layers + 2 * n_attn


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(image_size=30, ch_mult=(1, 2, 4)), "not divisible by 4"),
        (dict(attn_resolutions=(5,)), "not among"),
        (dict(ch=10, num_groups=4), "not divisible by num_groups"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(UserError, match=match):
        UNetConfig(**kw).validate()


def test_wrong_input_size(tiny_cfg, tiny_params):
    with pytest.raises(UserError, match="built for 16x16"):
        UNet(tiny_cfg).apply(
            {"params": tiny_params}, jnp.zeros((1, 28, 28, 1)), jnp.array([0])
        )


def test_bf16_close_to_fp32(tiny_cfg, tiny_params, tiny_eps_fn, key):
    import dataclasses

    bf = UNet(dataclasses.replace(tiny_cfg, dtype="bfloat16"))
    x = jax.random.normal(key, (2, 16, 16, 1))
    t = jnp.array([100, 700])
    a, b = tiny_eps_fn(x, t), bf.apply({"params": tiny_params}, x, t)
    assert b.dtype == jnp.float32
    assert float(jnp.mean(jnp.abs(a - b))) < 0.05 * float(jnp.mean(jnp.abs(a))) + 1e-3


@pytest.mark.parametrize("widths", [(12,), (5, 7), (8, 8, 8)])
def test_group_norm_of_parts_is_flax_group_norm_of_their_concatenation(widths, key):
    """Any split of the channels (5 + 7 with 4 groups: a group straddles the parts),
    same parameters, values equal to float32 rounding."""
    from tmpq_jax.models.norm import GroupNorm

    ks = jax.random.split(key, len(widths) + 2)
    parts = tuple(
        3.0 * jax.random.normal(k, (2, 6, 6, w)) + 1.0
        for k, w in zip(ks[: len(widths)], widths, strict=True)
    )
    c = sum(widths)
    p = {"params": {"scale": jax.random.normal(ks[-2], (c,)),
                    "bias": jax.random.normal(ks[-1], (c,))}}  # fmt: skip
    want = nn.GroupNorm(4).apply(p, jnp.concatenate(parts, -1))
    got = GroupNorm(4).apply(p, parts if len(parts) > 1 else parts[0])
    assert jax.tree.structure(GroupNorm(4).init(key, parts)) == jax.tree.structure(p)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not np.array_equal(got, 0 * got)


def test_unet_on_skip_parts_equals_the_concatenating_unet(tiny_cfg, tiny_params, key):
    """The up path hands (h, skip) parts to its blocks; with flax's GroupNorm on the
    materialized concatenation (the model before) the output agrees to rounding."""
    from unittest import mock

    from tmpq_jax.models import norm, unet

    class ConcatThenFlax(nn.GroupNorm):  # the model before: flax's on the concat
        def __call__(self, x, **kw):
            return super().__call__(norm.concat(x), **kw)

    x = jax.random.normal(key, (2, tiny_cfg.image_size, tiny_cfg.image_size, 1))
    t = jnp.array([3, 700])
    apply = UNet(tiny_cfg).apply
    got = apply({"params": tiny_params}, x, t)
    with mock.patch.object(unet, "GroupNorm", ConcatThenFlax):
        want = apply({"params": tiny_params}, x, t)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(want).max()) > 0.1
