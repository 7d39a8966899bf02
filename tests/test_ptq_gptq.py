"""GPTQ as a precision-solver method (`tmpq calibrate --method gptq`): the port
beats round-to-nearest where inputs correlate, its per-width weights are selected
by traced bits (one compile), and export, save/load and the CLI carry or refuse."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.cli import main
from tmpq_jax.errors import UserError
from tmpq_jax.models.unet import UNet
from tmpq_jax.quant import (
    QuantBits,
    intercept,
    numerics,
    ops,
    quantized_apply,
    unet_registry,
)
from tmpq_jax.quant.calibration import calibrate_model
from tmpq_jax.quant.calibration_io import load_calibration, save_calibration
from tmpq_jax.quant.export import convert, serve_apply
from tmpq_jax.quant.gptq import gptq_qparams, gptq_widths, layer_inputs, output_error
from tmpq_jax.quant.solver import check_method

pytestmark = pytest.mark.filterwarnings(
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
CANDIDATES = (8, 6, 4)


class ConvDense(nn.Module):
    """A strided, padded conv and a dense over tokens: the ops GPTQ must unfold."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME")(x)
        return nn.Dense(5)(y.reshape(y.shape[0], -1, 8))


def test_layer_inputs_reproduce_the_op_as_a_matmul():
    """X @ weight_2d(W) is the op's output: im2col order matches the kernel's."""
    model, x = ConvDense(), jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    variables = model.init(jax.random.key(1), x)
    from tmpq_jax.quant import build_registry

    reg = build_registry(model, variables, x)
    seen = []

    def grab(call):
        i = reg.index_of_site(call.site)
        c = ops.canonical(reg[i], call)
        X = layer_inputs(reg[i], call)
        w2d = ops.weight_2d(c.right, c.right_contracting)
        out = call.original()
        seen.append(float(jnp.abs(X @ w2d - out.reshape(-1, w2d.shape[1])).max()))
        return out

    with intercept.intercept(grab):
        model.apply(variables, x)
    assert len(seen) == 2 and max(seen) < 1e-4, seen


def _correlated(n=64, c=16, rows=2048, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n, n)) * 0.3 + np.eye(n)
    X = (rng.normal(size=(rows, n)) @ mix).astype(np.float32)
    return X, rng.normal(size=(n, c)).astype(np.float32)


def test_gptq_output_error_below_round_to_nearest_at_4_bits():
    X, w = _correlated()
    H = X.T @ X / len(X)
    clip = np.ones((2, w.shape[1]), np.float32)
    wq, new_clip = gptq_widths(w, H, clip, (4, 8))
    rtn4, _ = numerics.fake_quant_weight(
        jnp.asarray(w), numerics.WeightQuant(4, clip[0])
    )
    e_rtn, e_gptq = output_error(w, rtn4, H), output_error(w, wq[0], H)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    # the stored weights lie on the supernet's 4-bit grid: its own quantizer
    # (with the returned clip ratios) gives them back
    for k, b in enumerate((4, 8)):
        again, scale = numerics.fake_quant_weight(
            wq[k], numerics.WeightQuant(b, new_clip[k])
        )
        np.testing.assert_allclose(again, wq[k], atol=1e-6)
        ints = np.asarray(wq[k]) / np.asarray(scale).reshape(1, -1)
        assert np.abs(ints).max() <= 2 ** (b - 1) - 1 + 1e-3


@pytest.fixture(scope="module")
def tiny(tiny_cfg, tiny_params):
    model, reg = UNet(tiny_cfg), unet_registry(tiny_cfg)
    xs = jax.random.normal(jax.random.key(3), (8, 16, 16, 1))
    ts = jnp.array([10, 100, 300, 500, 700, 900, 950, 999], jnp.int32)
    base, _ = calibrate_model(
        model, tiny_params, reg, xs, ts, jax.random.key(4), CANDIDATES, batch_size=4
    )
    qp, info = gptq_qparams(
        model, tiny_params, reg, base, xs, ts, jax.random.key(5), batch_size=4
    )
    return dict(model=model, reg=reg, params=tiny_params, base=base, qp=qp,
                info=info, x=xs[:3], t=ts[:3])  # fmt: skip


def _genome(reg, seed):
    rng = np.random.default_rng(seed)
    pick = lambda: jnp.asarray(rng.choice(CANDIDATES, len(reg)), jnp.int32)
    return QuantBits(pick(), pick())


def _params_at(s, bits):
    """The model's params with each layer's stored GPTQ weight at its width."""
    params = jax.tree.map(lambda a: a, s["params"])
    for i, layer in enumerate(s["reg"]):
        if layer.kind == "matmul":
            continue
        k = CANDIDATES.index(int(bits.w_bits[i]))
        node = params
        for p in layer.param_path[:-1]:
            node = node[p]
        node[layer.param_path[-1]] = s["qp"].w_kernel[i][k]
    return params


def test_stored_weights_are_selected_by_traced_bits_in_one_compile(tiny):
    s, traces = tiny, []

    @jax.jit
    def run(w, a):
        traces.append(1)
        return quantized_apply(s["model"], {"params": s["params"]}, s["x"], s["t"],
                               bits=QuantBits(w, a), registry=s["reg"],
                               qparams=s["qp"], candidates=CANDIDATES)  # fmt: skip

    outs = []
    for seed in (0, 1):
        g = _genome(s["reg"], seed)
        got = run(g.w_bits, g.a_bits)
        # reference: no stored weights, the params swapped for that genome's rows
        want = quantized_apply(
            s["model"], {"params": _params_at(s, g)}, s["x"], s["t"], bits=g,
            registry=s["reg"], qparams=s["qp"].replace(w_kernel=None),
            candidates=CANDIDATES,
        )  # fmt: skip
        np.testing.assert_allclose(got, want, atol=1e-5)
        outs.append(got)
    assert len(traces) == 1
    assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-3


def test_gptq_lowers_the_layers_output_error_on_the_tiny_unet(tiny):
    ratios = [r[-1] for r in tiny["info"]["gptq_over_rtn"].values()]  # 4 bits
    assert np.median(ratios) < 0.9, ratios


def test_export_carries_the_gptq_weights(tiny):
    """SERVE of a converted genome equals the fake-quant supernet with GPTQ."""
    s, g = tiny, _genome(tiny["reg"], 2)
    qm = convert(s["params"], s["reg"], g, s["qp"], CANDIDATES)
    got = serve_apply(s["model"], qm, s["x"], s["t"], registry=s["reg"])
    want = quantized_apply(s["model"], {"params": s["params"]}, s["x"], s["t"],
                           bits=g, registry=s["reg"], qparams=s["qp"],
                           candidates=CANDIDATES)  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = convert(
        s["params"], s["reg"], g, s["qp"].replace(w_kernel=None), CANDIDATES
    )
    dropped = serve_apply(s["model"], plain, s["x"], s["t"], registry=s["reg"])
    assert float(jnp.abs(dropped - want).max()) > 1e-3


def test_save_load_round_trip_keeps_the_weights(tiny, tmp_path):
    s = tiny
    save_calibration(tmp_path / "c", s["qp"], s["reg"], CANDIDATES, {"method": "gptq"})
    qp, meta = load_calibration(tmp_path / "c", s["reg"], CANDIDATES)
    assert meta["stored_weights"] and meta["settings"]["method"] == "gptq"
    for a, b in zip(qp.w_kernel, s["qp"].w_kernel, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    save_calibration(tmp_path / "m", s["base"], s["reg"], CANDIDATES)
    assert load_calibration(tmp_path / "m", s["reg"], CANDIDATES)[0].w_kernel is None


def test_unknown_method_and_gptq_with_reconstruction_are_refused(capsys):
    with pytest.raises(UserError, match="unknown; use one of minmse, gptq"):
        check_method("awq-ish")
    with pytest.raises(UserError, match="use one of them, not both"):
        check_method("gptq", reconstruct_steps=10)
    rc = main(["calibrate", "--out", "/nonexistent/x", "--method", "nope",
               "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "'nope' is unknown" in err
