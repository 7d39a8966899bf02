"""Bias correction: each layer's mean quantization error, stored and removed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.quant import QuantBits, build_registry, quantized_apply
from tmpq_jax.quant import calibration as qc
from tmpq_jax.quant.bias_correction import bias_corrections
from tmpq_jax.quant.solver import solve
from tmpq_jax.sampling import LoadedModel

pytestmark = pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
CANDIDATES = (8, 4, 3)


class TwoConvs(nn.Module):
    """conv -> relu -> conv -> dense: the 2nd and 3rd layers' inputs are activations."""

    @nn.compact
    def __call__(self, x, t):
        del t
        h = nn.relu(nn.Conv(6, (3, 3), name="c0")(x))
        h = nn.Conv(5, (3, 3), strides=2, name="c1")(h)
        return nn.Dense(4, name="head")(h)


@pytest.fixture(scope="module")
def two_convs():
    x = 0.5 + jax.random.normal(jax.random.key(0), (16, 8, 8, 2))  # mean != 0
    t = jnp.zeros((16,), jnp.int32)
    model = TwoConvs()
    v = model.init(jax.random.key(1), x, t)
    reg = build_registry(model, v, x, t)
    qp, info = qc.calibrate_model(
        model, v["params"], reg, x, t, jax.random.key(2), CANDIDATES, batch_size=8
    )
    qp = qp.replace(
        bias_corr=bias_corrections(model, v["params"], reg, qp, x, t, batch_size=8)
    )
    return dict(model=model, v=v, reg=reg, qp=qp, info=info, x=x, t=t)


def test_stored_correction_is_each_layers_mean_error_on_its_float_input(two_convs):
    s = two_convs
    model, v, reg, qp, x, t = (s[k] for k in ("model", "v", "reg", "qp", "x", "t"))
    p = v["params"]
    assert len(qp.bias_corr) == len(reg)
    # The float inputs of each layer, computed here by hand.
    h0 = x
    h1 = nn.relu(nn.Conv(6, (3, 3)).apply({"params": p["c0"]}, x))
    h2 = nn.Conv(5, (3, 3), strides=2).apply({"params": p["c1"]}, h1)
    layers = [
        (0, nn.Conv(6, (3, 3)), h0),
        (1, nn.Conv(5, (3, 3), strides=2), h1),
        (2, nn.Dense(4), h2),
    ]
    for i, module, inp in layers:
        sub = {"params": p[reg[i].name]}
        one = build_registry(module, sub, inp)
        for kw, w in enumerate(qp.bit_widths):
            for ka, a in enumerate(qp.bit_widths):
                # The same layer alone, at (w, a), with the calibrated range and
                # clip ratios of layer i at those widths and no correction.
                sub_qp = qp.replace(
                    act_bound=qp.act_bound[i : i + 1],
                    w_clip=qp.w_clip[i : i + 1],
                    bias_corr=None,
                )
                bits = QuantBits(jnp.array([w]), jnp.array([a]))
                yq = quantized_apply(
                    module,
                    sub,
                    inp,
                    bits=bits,
                    registry=one,
                    qparams=sub_qp,
                    candidates=CANDIDATES,
                )
                err = np.asarray(yq - module.apply(sub, inp)).reshape(-1, yq.shape[-1])
                want = err.mean(0)
                np.testing.assert_allclose(
                    qp.bias_corr[i][kw, ka],
                    want,
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"{reg[i].name} W{w}A{a}",
                )
                if i == 0:
                    # The corrected layer's error has zero mean and a smaller MSE
                    # (MSE = variance + mean**2).
                    corr_qp = sub_qp.replace(bias_corr=qp.bias_corr[i : i + 1])
                    yc = quantized_apply(
                        module,
                        sub,
                        inp,
                        bits=bits,
                        registry=one,
                        qparams=corr_qp,
                        candidates=CANDIDATES,
                    )
                    errc = np.asarray(yc - module.apply(sub, inp))
                    errc = errc.reshape(-1, yc.shape[-1])
                    assert np.abs(errc.mean(0)).max() < 1e-5
                    assert (errc**2).mean() < (err**2).mean()
    # Low widths have larger mean errors than 8 bits on this data.
    i8, i3 = qp.bit_widths.index(8), qp.bit_widths.index(3)
    for corr in qp.bias_corr:
        assert np.abs(corr[i3, i3]).mean() > np.abs(corr[i8, i8]).mean()


def test_a_genome_selects_its_layers_corrections(two_convs):
    """Mixed widths: the supernet subtracts bias_corr[i][w_i, a_i] at layer i."""
    s = two_convs
    model, v, reg, qp, x, t = (s[k] for k in ("model", "v", "reg", "qp", "x", "t"))
    bits = QuantBits(jnp.array([3, 8, 4]), jnp.array([8, 3, 4]))
    run = lambda q: quantized_apply(
        model, v, x, t, bits=bits, registry=reg, qparams=q, candidates=CANDIDATES
    )
    # Only the last layer corrected: the output moves by exactly its entry.
    zeros = [jnp.zeros_like(c) for c in qp.bias_corr[:2]]
    only_head = qp.replace(bias_corr=(*zeros, qp.bias_corr[2]))
    k = qp.bit_widths.index
    diff = np.asarray(run(qp.replace(bias_corr=None)) - run(only_head))
    np.testing.assert_allclose(
        diff, np.broadcast_to(qp.bias_corr[2][k(4), k(4)], diff.shape), atol=1e-6
    )


class EpsNet(nn.Module):
    """A noise predictor of its own (x -> eps of x's shape) for the solver."""

    @nn.compact
    def __call__(self, x, t):
        del t
        h = nn.relu(nn.Conv(6, (3, 3), name="c0")(x))
        return nn.Conv(x.shape[-1], (3, 3), name="c1")(h)


def test_solver_corrects_for_the_ranges_reconstruction_keeps():
    x = jnp.zeros((1, 8, 8, 2))
    model = EpsNet()
    params = model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    lm = LoadedModel.from_module(model, params, image_size=8, channels=2)
    qp, settings, info = solve(
        lm, 0, (8, 4), 2, 4, reconstruct_steps=3, bias_correction=True, progress=False
    )
    assert settings["stage"] == "reconstruction" and settings["bias_correction"]
    assert len(info["reconstruction"]["fits"]) == 2 * 2  # 2 blocks x 2 widths
    xs, ts = qc.calibration_set(lm, jax.random.fold_in(jax.random.key(0), 0), 2, 4)
    reg = lm.layer_registry()
    want = bias_corrections(model, params, reg, qp.replace(bias_corr=None), xs, ts)
    jax.tree.map(np.testing.assert_array_equal, qp.bias_corr, want)
    # By default (no bias correction) nothing is stored.
    qp0, settings0, _ = solve(lm, 0, (8, 4), 2, 4, progress=False)
    assert qp0.bias_corr is None and not settings0["bias_correction"]
