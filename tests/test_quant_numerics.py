"""Traced-bit AQT numerics against AQT's stock static-bit configs, and error bounds."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2 import calibration as aqt_calibration
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax

from tmpq_jax.quant import QParams, QuantBits, build_registry, quantized_apply
from tmpq_jax.quant import numerics as qn

# AQT 0.9.0 calls jnp.promote_types on arrays (aqt_dot_general.py:823, conv too).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
ALL_BITS = tuple(range(2, 9))
# The largest |value| lands exactly half a step from its bucket: allow float32
# rounding of x / scale (a couple of ulps of |x|) on top of scale / 2.
_ULP = 2 * float(jnp.finfo(jnp.float32).eps)


# --- AQT's stock configs: static Python-int bits, stock IntSymmetric -------------------


def stock_dense_cls(bits, lhs_calibration=None, rhs_calibration=None, per_tensor=False):
    cfg = aqt_config.config_v4(fwd_bits=bits, dlhs_bits=None, drhs_bits=None)
    if per_tensor:
        cfg.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
    if lhs_calibration is not None:
        cfg.fwd.dg_quantizer.lhs.calibration = lhs_calibration
    if rhs_calibration is not None:
        cfg.fwd.dg_quantizer.rhs.calibration = rhs_calibration
    return functools.partial(aqt_flax.AqtDotGeneral, cfg, prng_name=None)


def stock_conv_cls(bits, lhs_calibration=None):
    raw = aqt_config.conv_general_dilated_make(
        2, lhs_bits=bits, rhs_bits=bits, initialize_calibration=False
    )
    if lhs_calibration is not None:
        raw.dg_quantizer.lhs.calibration = lhs_calibration
    raw.dg_quantizer.lhs.init_calibration()
    raw.dg_quantizer.rhs.init_calibration()
    cfg = aqt_config.default_unquantized_config()
    cfg.fwd = raw
    return functools.partial(aqt_flax.AqtConvGeneralDilated, cfg, prng_name=None)


# --- the same layers through the supernet, bits traced ----------------------------------

DENSE = nn.Dense(7)
CONV = nn.Conv(6, (3, 3), strides=(2, 2))


@pytest.fixture(scope="module")
def layers():
    k = jax.random.split(jax.random.key(3), 4)
    xd = jax.random.normal(k[0], (5, 40))
    xc = jax.random.normal(k[1], (3, 9, 9, 4))
    vd = DENSE.init(k[2], xd)
    vc = CONV.init(k[3], xc)
    regs = {
        "dense": build_registry(DENSE, vd, xd),
        "conv": build_registry(CONV, vc, xc),
    }
    return {"dense": (DENSE, vd, xd), "conv": (CONV, vc, xc)}, regs


@pytest.fixture(scope="module")
def traced_apply(layers):
    """One compiled function per layer kind serves every bit-width and batch slice."""
    mods, regs = layers

    def make(kind):
        model, v, _ = mods[kind]
        f = lambda v, x, b: quantized_apply(
            model, v, x, bits=QuantBits(b, b), registry=regs[kind], candidates=ALL_BITS
        )
        return jax.jit(f)

    return {kind: make(kind) for kind in mods}


def _bits(b):
    return jnp.array([b], jnp.int32)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_exactly_stock_aqt_at_every_width(layers, traced_apply, kind):
    """Batch 1: the stock per-example / per-row activation scale is per-tensor."""
    mods, _ = layers
    model, v, x = mods[kind]
    x = x[:1]
    for b in ALL_BITS:
        ours = traced_apply[kind](v, x, _bits(b))
        if kind == "dense":
            stock = nn.Dense(7, dot_general_cls=stock_dense_cls(b)).apply(v, x)
        else:
            stock = CONV.clone(conv_general_dilated_cls=stock_conv_cls(b)).apply(v, x)
        np.testing.assert_array_equal(ours, stock, err_msg=f"{kind} at {b} bits")
        assert float(jnp.abs(ours - model.apply(v, x)).max()) > 0  # really quantized
    assert traced_apply[kind]._cache_size() == 1


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_per_tensor_activation_scale_matches_stock(layers, traced_apply, kind):
    """Batch > 1: one dynamic absmax for the whole activation tensor. Dense: stock
    `per_tensor` calibration axes; conv (stock pins per-example axes): a stock
    constant range equal to the tensor's absmax."""
    mods, _ = layers
    model, v, x = mods[kind]
    absmax = float(jnp.max(jnp.abs(x)))
    const = functools.partial(aqt_calibration.ConstantCalibration, bound=absmax)
    for b in (2, 5, 8):
        ours = traced_apply[kind](v, x, _bits(b))
        if kind == "dense":
            stock = nn.Dense(7, dot_general_cls=stock_dense_cls(b, per_tensor=True))
        else:
            stock = CONV.clone(conv_general_dilated_cls=stock_conv_cls(b, const))
        # Conv: XLA may multiply the two output scales together first when one is
        # a broadcast scalar (ours) but not when it is per-example (stock's): 1 ulp.
        tol = 0.0 if kind == "dense" else 1e-6
        np.testing.assert_allclose(
            ours, stock.apply(v, x), rtol=tol, atol=tol, err_msg=f"{b} bits"
        )


def test_calibrated_results_are_selected_by_width_under_vmap(layers):
    """QParams hold a range and a clip ratio per width; a vmapped population picks
    its own, equal to stock AQT with that constant range and clipping scale."""
    mods, regs = layers
    _, v, x = mods["dense"]
    widths = (8, 6, 4, 3)
    bounds = jnp.array([1.5, 2.0, 0.7, 3.0])
    ratios = jnp.array([1.0, 0.9, 0.6, 0.8])
    qp = QParams(
        bit_widths=widths,
        act_bound=jnp.stack([bounds, jnp.ones(4)])[None],  # [L=1, 2, K]
        w_clip=(jnp.repeat(ratios[:, None], 7, axis=1),),  # [K, C_out]
    )
    pop = jnp.array([[3], [8], [4], [6]], jnp.int32)
    f = lambda b: quantized_apply(
        DENSE, v, x, bits=QuantBits(b, b), registry=regs["dense"], qparams=qp,
        candidates=widths,
    )  # fmt: skip
    out = jax.jit(jax.vmap(f))(pop)
    for i, b in enumerate(pop[:, 0].tolist()):
        k = widths.index(b)
        lhs = functools.partial(
            aqt_calibration.ConstantCalibration, bound=float(bounds[k])
        )
        rhs = functools.partial(
            aqt_calibration.AbsMaxCalibration, clipping_scale=float(ratios[k])
        )
        stock_cls = stock_dense_cls(b, lhs, rhs, per_tensor=True)
        stock = nn.Dense(7, dot_general_cls=stock_cls).apply(v, x)
        np.testing.assert_array_equal(out[i], stock, err_msg=f"{b} bits")


def test_per_channel_clip_ratio():
    w = jax.random.normal(jax.random.key(0), (16, 5))
    ratio = jnp.array([1.0, 0.5, 0.8, 0.3, 0.9])
    for b in (3, 6):
        wq, scale = qn.fake_quant_weight(w, qn.WeightQuant(jnp.int32(b), ratio))
        qmax = 2.0 ** (b - 1)
        want_scale = jnp.max(jnp.abs(w), axis=0) * ratio / (qmax - 0.5)
        np.testing.assert_allclose(scale[0], want_scale, rtol=1e-6)
        want = jnp.clip(jnp.round(w / want_scale), 1 - qmax, qmax - 1) * want_scale
        np.testing.assert_allclose(wq, want, rtol=1e-5, atol=1e-6)


def test_weight_error_is_at_most_half_a_step_and_shrinks_with_bits(layers):
    mods, _ = layers
    _, v, _ = mods["dense"]
    w = v["params"]["kernel"]
    mean_err = []
    fq = jax.jit(lambda w, b: qn.fake_quant_weight(w, qn.WeightQuant(b)))
    for b in ALL_BITS:
        wq, scale = fq(w, jnp.int32(b))
        err = jnp.abs(wq - w)
        assert scale.shape == (1, w.shape[1])  # per output channel
        assert bool(jnp.all(err <= scale / 2 + _ULP * jnp.abs(w))), b
        # traced bits give what static Python-int bits give
        wq_static, _ = qn.fake_quant_weight(w, qn.WeightQuant(b))
        np.testing.assert_array_equal(wq, wq_static)
        mean_err.append(float(err.mean()))
    assert all(e1 > e2 for e1, e2 in zip(mean_err, mean_err[1:], strict=False)), (
        mean_err
    )


def test_activation_error_bound_and_int8_container():
    x = jax.random.normal(jax.random.key(1), (4, 33)) * 3.0
    for b in (2, 4, 8):
        xq, scale = qn.fake_quant_activation(x, qn.ActQuant(jnp.int32(b)))
        assert scale.shape == (1, 1)  # per tensor
        assert bool(jnp.all(jnp.abs(xq - x) <= scale / 2 + _ULP * jnp.abs(x)))
    jaxpr = str(
        jax.make_jaxpr(lambda x, b: qn.fake_quant_activation(x, qn.ActQuant(b)))(
            x, jnp.int32(4)
        )
    )
    assert "i8[" in jaxpr and "i4[" not in jaxpr
