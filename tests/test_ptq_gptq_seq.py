"""Sequential GPTQ (`tmpq calibrate --method gptq_seq | gptaq`): on a 2-layer net
the later layer makes up for the earlier one's error (end-to-end error below
layer-wise GPTQ's), the target is the model's weight where the inputs are the
float ones, and the result is stored and selected like `gptq`'s."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.quant import QuantBits, build_registry, quantized_apply
from tmpq_jax.quant.calibration import calibrate_model
from tmpq_jax.quant.gptq import gptq_qparams, gptq_widths
from tmpq_jax.quant.gptq_seq import _target, gptq_seq_qparams, round_layer
from tmpq_jax.quant.solver import METHODS

pytestmark = pytest.mark.filterwarnings(
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
CANDIDATES = (8, 4)


class TwoDense(nn.Module):
    """Two dense layers (x, t) -> y; t is ignored (the calibration API's shape)."""

    @nn.compact
    def __call__(self, x, t):
        return nn.Dense(8)(nn.Dense(24)(x))


def _setup(n=256, d=24, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * 0.4 + np.eye(d)
    x = jnp.asarray(rng.normal(size=(2 * n, d)) @ mix, jnp.float32)
    t = jnp.zeros((2 * n,), jnp.int32)
    model = TwoDense()
    params = model.init(jax.random.key(1), x[:2], t[:2])["params"]
    reg = build_registry(model, {"params": params}, x[:2], t[:2])
    base, _ = calibrate_model(
        model, params, reg, x[:n], t[:n], jax.random.key(2), CANDIDATES, batch_size=64
    )
    return model, params, reg, base, (x[:n], t[:n]), (x[n:], t[n:])


def _error(model, params, reg, qp, x, t, w=4, a=8) -> float:
    bits = QuantBits.uniform(reg, w, a)
    y = model.apply({"params": params}, x, t)
    kw = dict(bits=bits, registry=reg, qparams=qp, candidates=CANDIDATES)
    yq = quantized_apply(model, {"params": params}, x, t, **kw)
    return float(jnp.mean((yq - y) ** 2))


def test_gptaq_end_to_end_error_below_layerwise_gptq():
    model, params, reg, base, (x, t), (xh, th) = _setup()
    key = jax.random.key(3)
    lw, _ = gptq_qparams(model, params, reg, base, x, t, key, batch_size=64)
    seq, info = gptq_seq_qparams(model, params, reg, base, x, t, key)
    plain, _ = gptq_seq_qparams(model, params, reg, base, x, t, key, compensate=False)
    err = {k: _error(model, params, reg, q, xh, th)
           for k, q in dict(rtn=base, gptq=lw, seq=plain, gptaq=seq).items()}  # fmt: skip
    assert err["gptq"] < err["rtn"], err
    # held-out inputs: the second layer absorbs the first one's rounding error
    assert err["gptaq"] < 0.8 * err["gptq"], err
    assert err["seq"] < err["rtn"], err
    assert info["compensate"] and info["hessian_layers"] == 2


def test_target_is_the_weight_where_inputs_are_float():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 12)).astype(np.float32)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    H = X.T @ X / len(X)
    np.testing.assert_array_equal(np.asarray(_target(w, H, H, 0.01, True)), w)
    # and then the rounding is layer-wise GPTQ's, on that Hessian
    clip = np.ones((5,), np.float32)
    wq, _, kept, ratio = round_layer(w, [(H, H)], clip, 4, 0.01, True)
    ref, _ = gptq_widths(w, H, clip[None], [4])
    np.testing.assert_allclose(np.asarray(wq), np.asarray(ref[0]), atol=1e-6)
    assert not kept and ratio < 1.0


def test_target_recovers_the_float_output_from_shifted_inputs():
    """X_q = X A (an earlier layer's linear error): W' = A^-1 W gives X W back."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4096, 10))
    A = np.eye(10) + 0.05 * rng.normal(size=(10, 10))
    Xq, w = X @ A, rng.normal(size=(10, 4))
    H, C = Xq.T @ Xq / len(X), Xq.T @ X / len(X)
    wt = np.asarray(_target(w, H, C, 1e-6, True), np.float64)
    rel = np.linalg.norm(Xq @ wt - X @ w) / np.linalg.norm(X @ w)
    assert rel < 1e-3, rel
    assert np.linalg.norm(Xq @ w - X @ w) / np.linalg.norm(X @ w) > 0.03


def test_methods_and_stored_widths():
    assert {"gptq_seq", "gptaq"} <= set(METHODS)
    model, params, reg, base, (x, t), _ = _setup(n=128)
    qp, _ = gptq_seq_qparams(model, params, reg, base, x, t, jax.random.key(0))
    for i, layer in enumerate(reg):
        assert qp.w_kernel[i].shape == (len(CANDIDATES), *layer.kernel_shape)
    # W8 stays close to float; W4 is coarser
    e8 = _error(model, params, reg, qp, x, t, w=8, a=8)
    e4 = _error(model, params, reg, qp, x, t, w=4, a=8)
    assert e8 < 0.2 * e4, (e8, e4)


def test_best_clip_is_per_channel_no_worse_than_min_mse_clip():
    from tmpq_jax.quant.gptq_seq import gptq_best_clip

    rng = np.random.default_rng(2)
    X = rng.normal(size=(1024, 16)) @ (np.eye(16) + 0.3 * rng.normal(size=(16, 16)))
    w = rng.standard_t(3, size=(16, 6)).astype(np.float32)  # heavy tails: clip
    H = (X.T @ X / len(X)).astype(np.float32)
    clip = np.full((6,), 0.9, np.float32)
    err = lambda v: np.sum((v - w) * (H @ (v - w)), axis=0)
    one, _ = gptq_best_clip(w, H, clip, 4, 0.01)
    ref, _ = gptq_widths(w, H, clip[None], [4])
    np.testing.assert_allclose(np.asarray(one), np.asarray(ref[0]), atol=1e-6)
    best, new_clip = gptq_best_clip(w, H, clip, 4, 0.01, (0.6, 0.8, 1.0, 1.2))
    assert (err(np.asarray(best)) <= err(np.asarray(one)) + 1e-6).all()
    assert err(np.asarray(best)).sum() < 0.98 * err(np.asarray(one)).sum()
    # the chosen clip makes the supernet's quantizer give back those weights
    from tmpq_jax.quant import numerics

    back, _ = numerics.fake_quant_weight(
        jnp.asarray(best), numerics.WeightQuant(4, new_clip)
    )
    np.testing.assert_allclose(np.asarray(back), np.asarray(best), atol=1e-5)


def test_fast_inputs_are_layer_inputs():
    """The gather (patches, permuted) gives the identity-kernel conv's X."""
    from tmpq_jax.quant import intercept
    from tmpq_jax.quant.gptq import layer_inputs
    from tmpq_jax.quant.gptq_seq import fast_inputs

    class Convs(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME")(x)
            return nn.Conv(4, (3, 2), padding=((1, 1), (0, 1)))(y)

    model, x = Convs(), jax.random.normal(jax.random.key(0), (3, 9, 9, 5))
    variables = model.init(jax.random.key(1), x)
    reg = build_registry(model, variables, x)
    diffs, cache = [], {}

    def grab(call):
        i = reg.index_of_site(call.site)
        a, b = fast_inputs(reg[i], call, cache), layer_inputs(reg[i], call)
        diffs.append(float(jnp.abs(a - b).max()))
        return call.original()

    with intercept.intercept(grab):
        model.apply(variables, x)
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs
    assert all(v is not None for v in cache.values())


def test_gptq_statistics_use_true_f32_dots_whatever_the_default(monkeypatch):
    """GPUs run f32 dots in TF32 and TPUs in one bf16 pass unless told otherwise;
    GPTQ's Hessians and gptaq's X_q^T X - X_q^T X_q are made under 'highest' even
    inside a caller's lower default (CPUs ignore the setting, so this checks it is
    set where the statistics are made, not the arithmetic), and the caller's
    setting is back afterwards."""
    from jax._src import config

    from tmpq_jax.quant import gptq, gptq_seq

    seen = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            seen.append((fn.__name__, config.default_matmul_precision.value))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(gptq.gptq_core, "compute_hessian", spy(gptq.gptq_core.compute_hessian))
    monkeypatch.setattr(gptq_seq, "_stats", spy(gptq_seq._stats))
    model, params, reg, base, (x, t), _ = _setup(n=64)
    key = jax.random.key(3)
    with jax.default_matmul_precision("bfloat16"):
        gptq_qparams(model, params, reg, base, x, t, key, batch_size=64)
        gptq_seq_qparams(model, params, reg, base, x, t, key)
        assert config.default_matmul_precision.value == "bfloat16"
    assert {name for name, _ in seen} == {"compute_hessian", "_stats"}, seen
    assert {p for _, p in seen} == {"highest"}, seen


def test_pass_matmuls_in_float_are_the_int8_dot():
    """The gptaq pass runs attention matmuls as float fake-quant
    (`ops.quantized_in_float`): the same as AQT's int8 dot to f32 rounding, for
    both einsums of an attention block (batch dims in the middle, a swap)."""
    from tmpq_jax.models.ops import MatMul
    from tmpq_jax.quant import intercept, numerics, ops

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, q, k):
            logits = MatMul("blhd,bmhd->bhlm", name="qk")(q, k)
            return MatMul("bhlm,bmhd->blhd", name="av")(jax.nn.softmax(logits), k)

    q, k = (jax.random.normal(jax.random.key(s), (3, 7, 2, 8)) for s in (0, 1))
    model = Attn()
    variables = model.init(jax.random.key(2), q, k)
    reg = build_registry(model, variables, q, k)
    got = []

    def both(call):
        layer = reg[reg.index_of_site(call.site)]
        left, right = (numerics.ActQuant(6, jnp.float32(b)) for b in (2.5, 3.0))
        a = ops.quantized(layer, call, left, right)
        b = ops.quantized_in_float(layer, call, left, right)
        got.append((float(jnp.abs(a - b).max()), float(jnp.abs(a).max()),
                    float(jnp.abs(a - call.original()).max())))  # fmt: skip
        return a

    with intercept.intercept(both):
        model.apply(variables, q, k)
    assert len(got) == 2, got
    for diff, size, quant_err in got:
        assert diff <= 1e-5 * size, got  # f32 rounding
        assert quant_err > 100 * diff, got  # far below the quantization error
