"""Layer registry, cost model and boundary validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.errors import UserError
from tmpq_jax.models.unet import AttnBlock, UNet
from tmpq_jax.quant import (
    QParams,
    QuantBits,
    bitops_per_step,
    build_registry,
    check_bits,
    check_candidates,
    format_registry,
    layer_bitops,
    model_size_bits,
    quantized_apply,
    total_bitops,
    unet_registry,
    uniform_bitops,
    within_budget,
)

# Attention alone: 2x2 pixels (L = 4 tokens), C = 4 channels, 2 heads of 2.
ATTN = AttnBlock(num_heads=2, num_groups=2, dtype=jnp.float32)
ATTN_X = jax.ShapeDtypeStruct((1, 2, 2, 4), jnp.float32)


@pytest.fixture(scope="module")
def attn_reg():
    return build_registry(
        ATTN, jax.eval_shape(ATTN.init, jax.random.key(0), ATTN_X), ATTN_X
    )


@pytest.fixture(scope="module")
def tiny_reg(tiny_cfg):
    return unet_registry(tiny_cfg)


def test_attention_registry_hand_count(attn_reg):
    assert attn_reg.names == ("qkv", "qk", "av", "proj")
    assert attn_reg.kinds == ("dense", "matmul", "matmul", "dense")
    # qkv: 4 tokens x 4 in x 12 out; qk: (HW)^2 * C = 16 * 4; av: same; proj: 4x4x4
    assert list(attn_reg.macs) == [192, 64, 64, 64]
    assert list(attn_reg.params) == [48, 0, 0, 16]
    assert list(attn_reg.pinned_lhs_bits) == [0, 0, 8, 0]  # softmax output of av


def test_cost_model_hand_count(attn_reg):
    bits = QuantBits(jnp.array([5, 6, 7, 8]), jnp.array([8, 7, 6, 5]))
    # qkv: 192*w*a; qk: 64*b_q*b_k = 64*a*w; av: 64*b_softmax(8)*b_v(w); proj: 64*w*a
    per_layer = [192 * 5 * 8, 64 * 7 * 6, 64 * 8 * 7, 64 * 8 * 5]
    np.testing.assert_array_equal(layer_bitops(bits, attn_reg), per_layer)
    assert float(bitops_per_step(bits, attn_reg)) == sum(per_layer) == 16512
    assert float(total_bitops(bits, attn_reg, jnp.int32(10))) == 165120
    assert float(model_size_bits(bits, attn_reg)) == 48 * 5 + 16 * 8
    # budget: uniform W6A6 (MatMul operands are activations: 6 x 6; softmax 8)
    assert float(uniform_bitops(attn_reg)) == 192 * 36 + 64 * 36 + 64 * 48 + 64 * 36
    assert not bool(within_budget(bitops_per_step(bits, attn_reg), 16511.0))
    assert bool(within_budget(uniform_bitops(attn_reg), uniform_bitops(attn_reg)))


def test_cost_model_vectorizes_and_jits(tiny_reg):
    rng = np.random.default_rng(0)
    pop = QuantBits(
        *(jnp.asarray(rng.choice([5, 8], (3, len(tiny_reg)))) for _ in "wa")
    )
    f = jax.jit(lambda b, n: total_bitops(b, tiny_reg, n))
    got = f(pop, jnp.int32(4))
    for i in range(3):
        one = jax.tree.map(lambda a, i=i: a[i], pop)
        np.testing.assert_allclose(
            got[i], 4 * bitops_per_step(one, tiny_reg), rtol=1e-6
        )


def test_unet_registry_names_stable_and_readable(tiny_cfg, tiny_reg):
    again = unet_registry(tiny_cfg)
    assert again.names == tiny_reg.names and again == tiny_reg
    x = jnp.zeros((3, 16, 16, 1))
    model = UNet(tiny_cfg)
    v = jax.eval_shape(model.init, jax.random.key(1), x, jnp.zeros((3,), jnp.int32))
    other_batch = build_registry(model, v, x, jnp.zeros((3,), jnp.int32))
    assert other_batch.names == tiny_reg.names
    np.testing.assert_array_equal(other_batch.macs, tiny_reg.macs)  # per sample
    names = tiny_reg.names
    assert names[:3] == ("temb0", "temb1", "conv_in") and names[-1] == "conv_out"
    for n in ("down_0_res_0/conv0", "down_1_res_0/skip", "mid_attn/qk", "mid_attn/av"):
        assert n in names
    # DESIGN.md's attention cost: (HW)^2 * C per matmul, mid block at 8x8, C = 16
    assert tiny_reg[tiny_reg.index("mid_attn/qk")].macs == 64**2 * 16
    # conv_in hand count: 16x16 pixels x 8 out channels x (3x3x1) kernel
    conv_in = tiny_reg[tiny_reg.index("conv_in")]
    assert conv_in.macs == 16 * 16 * 8 * 9 and conv_in.params == 72
    table = format_registry(tiny_reg)
    assert all(n in table for n in names) and "total" in table


def test_bad_inputs_raise_user_errors(tiny_reg, attn_reg):
    n = len(tiny_reg)
    good = QuantBits.uniform(tiny_reg, 8, 8)
    with pytest.raises(UserError, match="quantizable layers"):
        check_bits(QuantBits(good.w_bits[:-1], good.a_bits[:-1]), tiny_reg)
    with pytest.raises(UserError, match=r"outside the candidate set \[8, 7, 6, 5\]"):
        check_bits(good.replace(a_bits=good.a_bits.at[3].set(4)), tiny_reg)
    check_bits(QuantBits.uniform(tiny_reg, 2, 3), tiny_reg, candidates=(4, 3, 2))
    with pytest.raises(UserError, match="outside the candidate set"):
        check_bits(QuantBits.uniform(tiny_reg, 8, 8), tiny_reg, candidates=(4, 3, 2))
    for bad in [(9, 8), (1, 2), (), (8, 8)]:
        with pytest.raises(UserError, match="candidate bit-widths"):
            check_candidates(bad)
    with pytest.raises(UserError, match="population"):
        check_bits(QuantBits(good.w_bits[None], good.a_bits[None]), tiny_reg)
    check_bits(
        QuantBits(good.w_bits[None], good.a_bits[None]), tiny_reg, population=True
    )
    with pytest.raises(UserError) as err:
        tiny_reg.index("mid_attn/nope")
    assert "format_registry" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown layer name"):
        QuantBits.from_names(tiny_reg, {"conv_inn": (8, 8)})
    assert QuantBits.from_names(tiny_reg, {"conv_in": (5, 6)}).w_bits[2] == 5
    assert n == len(good.w_bits)


def test_bad_inputs_to_quantized_apply(attn_reg):
    x = jnp.ones((1, 2, 2, 4))
    v = ATTN.init(jax.random.key(0), x)
    bits = QuantBits.uniform(attn_reg, 8, 8)
    with pytest.raises(UserError, match="quantizable layers"):
        quantized_apply(ATTN, v, x, bits=QuantBits.uniform(attn_reg, 8, 8).replace(
            w_bits=jnp.full((3,), 8)), registry=attn_reg)  # fmt: skip
    with pytest.raises(UserError, match="outside the candidate set"):
        quantized_apply(
            ATTN, v, x, bits=QuantBits.uniform(attn_reg, 4, 4), registry=attn_reg
        )
    # a registry of another model: its layers are not found by path
    dense = nn.Dense(4)
    other = build_registry(dense, dense.init(jax.random.key(0), x), x)
    with pytest.raises(UserError, match="not in the layer registry"):
        quantized_apply(ATTN, v, x, bits=QuantBits.uniform(other, 8, 8), registry=other)
    # calibration that does not cover a candidate (or the pinned 8-bit softmax)
    qp = QParams(bit_widths=(6, 5), act_bound=jnp.ones((4, 2, 2)))
    with pytest.raises(UserError, match=r"not \[7, 8\]"):
        quantized_apply(ATTN, v, x, bits=bits, registry=attn_reg, qparams=qp)
    qp = QParams(bit_widths=(8, 7, 6, 5), act_bound=jnp.ones((4, 2, 3)))
    with pytest.raises(UserError, match="act_bound has shape"):
        quantized_apply(ATTN, v, x, bits=bits, registry=attn_reg, qparams=qp)
