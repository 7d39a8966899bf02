"""Bring-your-own-model quantization: every matmul and convolution, whoever runs it.

Three models written with stock Flax only (tests/byo_models.py: a Linen DiT with
`nn.MultiHeadDotProductAttention`, a Linen module of bare `jnp.einsum` / `@` /
`nn.Einsum` / `DenseGeneral` / `ConvTranspose` with a hand-written softmax, an
NNX DiT) and the shipped UNet's architecture.
"""

import byo_models as bm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from tmpq_jax.errors import UserError
from tmpq_jax.models.nnx_model import NNXModel
from tmpq_jax.quant import (
    QuantBits,
    build_registry,
    check_coverage,
    format_registry,
    intercept,
    quantized_apply,
)
from tmpq_jax.quant.cost import bitops_per_step
from tmpq_jax.quant.export import convert, serve_apply
from tmpq_jax.quant.supernet import make_handler

MODELS = ("linen_dit", "einsum_net", "nnx_dit")


def _build(name):
    x, t = bm.inputs(2)
    if name == "nnx_dit":
        model = NNXModel(bm.NNXDiT(nnx.Rngs(0)))
        variables = {"params": model.params}
        return model, variables, bm.nnx_dit_macs()
    model = {"linen_dit": bm.LinenDiT, "einsum_net": bm.EinsumNet}[name]()
    macs = {"linen_dit": bm.linen_dit_macs, "einsum_net": bm.einsum_net_macs}[name]()
    return model, model.init(jax.random.key(0), x, t), macs


@pytest.fixture(scope="module", params=MODELS)
def byo(request):
    model, variables, macs = _build(request.param)
    x, t = bm.inputs(2)
    return request.param, model, variables, build_registry(model, variables, x, t), macs


def test_coverage_is_complete_and_macs_match_an_independent_count(byo):
    name, _, _, reg, macs = byo
    assert reg.coverage == 1.0 and not reg.float_ops
    assert reg.macs.sum() == pytest.approx(macs)
    assert "coverage: 100.00%" in format_registry(reg)


def test_every_op_differs_from_float_at_w2a2(byo):
    """No op is left in float without a word: each one's output moves at W2A2."""
    _, model, variables, reg, _ = byo
    x, t = bm.inputs(2)
    bits = QuantBits.uniform(reg, 2, 2)
    quant = make_handler(bits, reg)

    @jax.jit
    def moved(variables):
        out = {}

        def compare(call):
            q = quant(call)
            out[reg[reg.index_of_site(call.site)].name] = jnp.any(q != call.original())
            return q

        with intercept.intercept(compare):
            model.apply(variables, x, t)
        return out

    assert {k: bool(v) for k, v in moved(variables).items()} == {
        name: True for name in reg.names
    }


def test_softmax_operand_is_pinned_whatever_the_module_is_called(byo):
    name, _, _, reg, _ = byo
    pinned = {x.name for x in reg if x.pinned_lhs_bits}
    want = {
        "linen_dit": {"mixer/op_1"},
        "einsum_net": {"op_2"},
        "nnx_dit": {"attn/op_1"},
    }[name]
    assert pinned == want
    assert all(reg[reg.index(n)].pinned_lhs_bits == 8 for n in want)
    # Both q.k operands are activations, each with its own gene.
    qk = [x for x in reg if x.kind == "matmul" and not x.pinned_lhs_bits]
    assert len(qk) == 1 and qk[0].kernel_shape is None


def test_int8_serve_equals_fake_quant(byo):
    _, model, variables, reg, _ = byo
    x, t = bm.inputs(2)
    rng = np.random.default_rng(1)
    bits = QuantBits(
        jnp.asarray(rng.choice([8, 6, 5], len(reg)), jnp.int32),
        jnp.asarray(rng.choice([8, 7, 6], len(reg)), jnp.int32),
    )
    fq = quantized_apply(model, variables, x, t, bits=bits, registry=reg)
    qm = convert(variables["params"], reg, bits)
    served = serve_apply(model, qm, x, t, registry=reg)
    np.testing.assert_array_equal(np.asarray(served), np.asarray(fq))


class NCHWConv(nn.Module):
    """A convolution AQT cannot take (channels-first), beside a Dense."""

    @nn.compact
    def __call__(self, x, t):
        k = self.param("k", nn.initializers.lecun_normal(), (1, 1, 3, 3))
        y = jax.lax.conv_general_dilated(
            x.transpose(0, 3, 1, 2), k, (1, 1), "SAME",
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )  # fmt: skip
        return nn.Dense(1, name="d")(y.transpose(0, 2, 3, 1))


def test_an_op_that_cannot_be_quantized_is_reported_and_refused():
    model = NCHWConv()
    x, t = bm.inputs(2)
    variables = model.init(jax.random.key(0), x, t)
    reg = build_registry(model, variables, x, t)
    assert reg.names == ("d",) and len(reg.float_ops) == 1
    op = reg.float_ops[0]
    assert "channels-last" in op.reason and op.macs == 16 * 16 * 9
    assert reg.coverage == pytest.approx(256 / (256 + 16 * 16 * 9))
    assert "left in float" in format_registry(reg)
    with pytest.raises(UserError, match="cannot be quantized.*keep_float"):
        check_coverage(reg)
    check_coverage(reg, keep_float=[op.name])
    with pytest.raises(UserError, match="not ops left in float"):
        check_coverage(reg, keep_float=["d"])
    # Kept in float, it counts at 16 x 16 bits.
    bits = QuantBits.uniform(reg, 8, 8)
    assert float(bitops_per_step(bits, reg)) == 256 * 64 + op.macs * 256
