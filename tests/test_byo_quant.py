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
    numerics,
    ops,
    quantized_apply,
)
from tmpq_jax.quant.cost import bitops_per_step
from tmpq_jax.quant.export import convert, serve_apply
from tmpq_jax.quant.supernet import make_handler, operand_specs

MODELS = ("linen_dit", "einsum_net", "nnx_dit", "unet")


def _build(name):
    x, t = bm.inputs(2)
    if name == "unet":  # MACs hand-counted in test_quant_registry.py
        from conftest import TINY_UNET

        from tmpq_jax.models.unet import UNet

        model = UNet(TINY_UNET)
        return model, model.init(jax.random.key(0), x, t), None
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
    if macs is not None:
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
        "unet": {n for n in reg.names if n.endswith("/av")},
    }[name]
    assert want
    assert pinned == want
    assert all(reg[reg.index(n)].pinned_lhs_bits == 8 for n in want)
    # Both q.k operands are activations, each with its own gene.
    qk = [x for x in reg if x.kind == "matmul" and not x.pinned_lhs_bits]
    assert len(qk) == len(want) and all(x.kernel_shape is None for x in qk)


def test_int8_serve_equals_fake_quant(byo):
    """SERVE from frozen int8 weights equals the fake-quant op bit for bit, op by
    op on the same inputs; whole programs (compiled apart) agree to float rounding."""
    _, model, variables, reg, _ = byo
    x, t = bm.inputs(2)
    rng = np.random.default_rng(1)
    bits = QuantBits(
        jnp.asarray(rng.choice([8, 6, 5], len(reg)), jnp.int32),
        jnp.asarray(rng.choice([8, 7, 6], len(reg)), jnp.int32),
    )

    @jax.jit
    def per_op(variables):
        gaps = {}

        def both(call):
            i = reg.index_of_site(call.site)
            layer, (left, right) = reg[i], operand_specs(i, reg, bits, None)
            fq = ops.quantized(layer, call, left, right)
            if layer.kind != "matmul":
                c = ops.canonical(layer, call)
                q, scale = numerics.convert_weight(c.right, right, c.right_contracting)
                gaps[layer.name] = jnp.max(
                    jnp.abs(ops.served(layer, call, left, q, scale) - fq)
                )
            return fq

        with intercept.intercept(both):
            model.apply(variables, x, t)
        return gaps

    gaps = {k: float(v) for k, v in per_op(variables).items()}
    assert gaps and all(v == 0.0 for v in gaps.values()), gaps
    fq = jax.jit(lambda v: quantized_apply(model, v, x, t, bits=bits, registry=reg))(
        variables
    )
    qm = convert(variables["params"], reg, bits)
    served = jax.jit(lambda q: serve_apply(model, q, x, t, registry=reg))(qm)
    np.testing.assert_allclose(np.asarray(served), np.asarray(fq), rtol=1e-5, atol=1e-5)


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


def test_interception_alone_changes_nothing(byo):
    """Ops handed back as they came (jax's attention run as plain einsums)."""
    _, model, variables, _, _ = byo
    x, t = bm.inputs(2)

    def through(v):
        with intercept.intercept(lambda call: call.original()):
            return model.apply(v, x, t)

    want = jax.jit(lambda v: model.apply(v, x, t))(variables)
    np.testing.assert_allclose(jax.jit(through)(variables), want, rtol=1e-5, atol=1e-6)
