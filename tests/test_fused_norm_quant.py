"""The fused GroupNorm + SiLU + quantizer kernel (Pallas, interpret mode on the CPU)
against the model's own composition: GroupNorm, nn.silu, AQT's conv lhs quantizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import fused_norm_quant as naq
from tmpq_jax.models.norm import GroupNorm
from tmpq_jax.quant import numerics as qn

# (part shapes, groups): the up path's (h, skip); one part with H*W = 36 (not 2**k)
CASES = {
    "two_parts_8x8": (((2, 8, 8, 4), (2, 8, 8, 4)), 2),
    "one_part_6x6": (((2, 6, 6, 8),), 2),
}
# (bits, bound): a wide bound (no clipping) and a narrow one (clipping at 15)
QUANTS = ((8, 3.0), (5, 0.5))
# fused vs reference: the statistics are summed in another order, so mean / rstd may
# differ by an ulp, which moves a value across a rounding edge (on an H100 about one
# value in 3 million, kernel_breakdown_gnq.json); allow 1-LSB differences in 1
# element per 1000 (here: none, at these sizes), never more than 1 LSB.
MAX_LSB, MAX_FRACTION = 1, 1e-3


def _model_path(parts, scale, bias, groups, bound, bits):
    """What the UNet computes: GroupNorm(parts) -> nn.silu -> the int8 value AQT's
    conv quantizer makes of its lhs (`numerics.conv_general_dilated`)."""
    params = {"params": {"scale": scale, "bias": bias}}
    y = nn.silu(GroupNorm(groups).apply(params, parts))
    c = y.shape[-1]
    raw = qn.conv_config(qn.ActQuant(bits, bound), qn.WeightQuant(8), 2)
    w = jnp.ones((3, 3, c, c))
    (lhs, lhs_qt), (rhs, rhs_qt) = raw.dg_quantizer.calibrate(y, w, None, None, None)
    (lhs_q, _), _ = raw.dg_quantizer.calculate_qvalue(lhs, lhs_qt, rhs, rhs_qt)
    return lhs_q.qvalue


@pytest.fixture(scope="module")
def outputs():
    """{(case, bits, bound): (model, reference, *kernels)} as int32 numpy; each
    function compiled once per shape (bits and bound are traced)."""
    model = jax.jit(_model_path, static_argnums=3)
    ref = jax.jit(naq.reference, static_argnums=3)
    out = {}
    for name, (shapes, groups) in CASES.items():
        keys = jax.random.split(jax.random.key(7), len(shapes) + 2)
        parts = tuple(
            1.5 * jax.random.normal(k, s) + 0.2
            for k, s in zip(keys, shapes, strict=False)
        )
        c = sum(s[-1] for s in shapes)
        scale = 1.0 + 0.3 * jax.random.normal(keys[-2], (c,))
        bias = 0.3 * jax.random.normal(keys[-1], (c,))
        for bits, bound in QUANTS:
            args = (parts, scale, bias, groups, jnp.float32(bound), jnp.int32(bits))
            fused = naq.fused(*args, interpret=True)
            # a small tile: several row tiles per sample (a ragged last one at 6x6)
            blocks = naq.fused_blocks(*args, gpb=1, block=16, interpret=True)
            # a large tile: each program's block read once, in one tile
            whole = naq.fused_blocks(*args, gpb=1, block=4096, interpret=True)
            out[name, bits, bound] = tuple(
                np.asarray(v, np.int32)
                for v in (model(*args), ref(*args), fused, blocks, whole)
            )
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits,bound", QUANTS)
def test_reference_is_the_model_path(outputs, case, bits, bound):
    model, ref, *_ = outputs[case, bits, bound]
    np.testing.assert_array_equal(ref, model)
    limit = 2 ** (bits - 1) - 1
    assert np.abs(ref).max() <= limit
    if bound < 1:  # the narrow bound clips
        assert (ref == limit).any()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits,bound", QUANTS)
def test_fused_kernels_match_reference(outputs, case, bits, bound):
    _, ref, *kernels = outputs[case, bits, bound]
    for out in kernels:
        assert out.shape == ref.shape
        diff = np.abs(out - ref)
        assert diff.max() <= MAX_LSB
        assert np.mean(diff != 0) <= MAX_FRACTION, np.mean(diff != 0)


def test_group_blocks_must_not_straddle_parts():
    parts = (jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))  # groups of 4
    with pytest.raises(ValueError, match="whole blocks"):
        naq.fused_blocks(parts, jnp.ones(8), jnp.zeros(8), 2, 1.0, 8, gpb=2)


def test_variant_names_give_kernel_knobs():
    from benchmarks.norm_quant_programs import variants

    only = {"gnq_28_pallas_b4096_w16_s3", "gnq_28_blocks_g2_b1024_w4",
            "gnq_14_blocks_g1_b64_w2", "gnq_28_xla", "gnq_28_blocks_g2"}  # fmt: skip
    got = variants(only, 28)
    assert got == {
        "gnq_28_pallas_b4096_w16_s3": (
            naq.fused, dict(block=4096, num_warps=16, num_stages=3)
        ),
        "gnq_28_blocks_g2_b1024_w4": (
            naq.fused_blocks, dict(gpb=2, block=1024, num_warps=4)
        ),
    }  # fmt: skip


def test_round_half_even():
    """The kernel's rounding is lax.round(TO_NEAREST_EVEN) on the clipped range,
    ties and their float32 neighbours included."""
    k = np.arange(-128, 128, dtype=np.float32)
    ties = np.concatenate([k + 0.5, k + 0.25, k])
    v = np.concatenate(
        [
            ties,
            np.nextafter(ties, np.float32(np.inf)),
            np.nextafter(ties, np.float32(-np.inf)),
        ]
    )
    v = np.concatenate([v, np.random.default_rng(0).uniform(-128, 128, 4096)])
    v = jnp.asarray(v, jnp.float32)
    got = jax.jit(naq.round_half_even)(v)
    want = jax.lax.round(v, jax.lax.RoundingMethod.TO_NEAREST_EVEN)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
