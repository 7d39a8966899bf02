"""The STE fake-quant and block reconstruction (learned step sizes) on the tiny UNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.diffusion.schedules import DiffusionConfig
from tmpq_jax.quant import (
    QParams,
    QuantBits,
    build_registry,
    quantized_apply,
    ste,
    unet_registry,
)
from tmpq_jax.quant import calibration as qc
from tmpq_jax.quant import calibration_io as qio
from tmpq_jax.quant import numerics as qn
from tmpq_jax.quant import reconstruction as rc
from tmpq_jax.quant.intercept import intercept
from tmpq_jax.sampling import LoadedModel

pytestmark = pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
CANDIDATES = (8, 4)
# One block of every kind: a conv alone, a res block (convs, a dense, a 1x1 skip),
# an attention block (denses, both matmuls, the pinned softmax operand), and an up
# path res block, whose input is the (h, skip) parts.
BLOCKS = ("conv_in", "down_1_res_0", "down_1_attn_0", "up_0_res_0")


# --- the STE fake-quant ------------------------------------------------------------


@pytest.mark.parametrize("traced", [False, True])
def test_ste_forward_is_the_aqt_forward_exactly(traced):
    k = jax.random.split(jax.random.key(0), 3)
    x = 2.0 * jax.random.laplace(k[0], (3, 7, 7, 5))
    w = jax.random.normal(k[1], (3, 3, 5, 6))
    ratio = jax.random.uniform(k[2], (6,), minval=0.5, maxval=1.0)
    for bits in range(2, 9):
        b = jnp.int32(bits) if traced else bits
        for bound in (0.3, 1.7, float(jnp.max(jnp.abs(x)))):
            ref, _ = qn.fake_quant_activation(x, qn.ActQuant(b, bound))
            np.testing.assert_array_equal(ste.fake_quant_activation(x, b, bound), ref)
        for clip in (None, ratio):
            ref, _ = qn.fake_quant_weight(w, qn.WeightQuant(b, clip))
            np.testing.assert_array_equal(ste.fake_quant_weight(w, b, clip), ref)


def test_ste_gradients_are_lsq():
    x = jnp.array([-3.0, -0.26, 0.0, 0.1, 0.4, 5.0])  # x/s: -6 .. 10
    s = jnp.float32(0.5)
    qb = ste.quant_bound(2)  # clip level 1: [-1, 0, 1]
    y, vjp = jax.vjp(lambda x, s: ste.fake_quant(x, s, qb), x, s)
    np.testing.assert_array_equal(y, [-0.5, -0.5, 0.0, 0.0, 0.5, 0.5])
    dx, ds = vjp(jnp.ones_like(x))
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 1, 0])  # straight through in range
    # dy/ds: q - x/s inside, the clip level q outside.
    want = -1 + (-1 + 0.52) + 0 + (0 - 0.2) + (1 - 0.8) + 1
    np.testing.assert_allclose(ds, want, rtol=1e-6)
    # Through the stored parameters, nonzero and finite.
    w = jax.random.normal(jax.random.key(1), (4, 4, 3, 5))
    err = lambda r: jnp.sum(jnp.square(ste.fake_quant_weight(w, 4, r) - w))
    g = jax.grad(err)(jnp.full((5,), 0.8))
    assert np.isfinite(g).all() and (g != 0).all()
    errb = lambda bd: jnp.sum(jnp.square(ste.fake_quant_activation(x, 3, bd) - x))
    gb = jax.grad(errb)(2.0)
    assert np.isfinite(gb) and gb != 0


# --- the tiny UNet -----------------------------------------------------------------


@pytest.fixture(scope="module")
def recon(tiny_cfg, tiny_params):
    lm = LoadedModel(tiny_cfg, DiffusionConfig(), tiny_params, {"name": "tiny"})
    reg = unet_registry(tiny_cfg)
    key = jax.random.key(5)
    qp, info = qc.calibrate(
        lm, key, CANDIDATES, 4, 4, progress=False, registry=reg, max_values=2**12
    )
    xs, ts = qc.calibration_set(lm, jax.random.fold_in(key, 0), 4, 4)
    blocks = [b for b in rc.group_blocks(reg) if b.name in BLOCKS]
    new, rinfo = rc.reconstruct(
        lm.model,
        tiny_params,
        reg,
        qp,
        xs,
        ts,
        jax.random.key(6),
        steps=10,
        lr=2e-2,
        batch_size=8,
        blocks=blocks,
    )
    return dict(
        lm=lm, reg=reg, qp=qp, info=info, new=new, rinfo=rinfo, xs=xs, ts=ts,
        blocks=blocks,
    )  # fmt: skip


def test_blocks_group_layers_by_path_prefix(recon):
    reg = recon["reg"]
    blocks = rc.group_blocks(reg)
    assert sorted(i for b in blocks for i in b.layers) == list(range(len(reg)))
    by_name = {b.name: b for b in blocks}
    assert set(BLOCKS) <= set(by_name)
    attn = [reg[i].name for i in by_name["down_1_attn_0"].layers]
    assert attn == [f"down_1_attn_0/{n}" for n in ("qkv", "qk", "av", "proj")]
    assert [reg[i].name for i in by_name["conv_in"].layers] == ["conv_in"]


@pytest.fixture(scope="module")
def captured(recon):
    lm, blocks = recon["lm"], recon["blocks"]
    v = {"params": lm.params}
    xs, ts = recon["xs"], recon["ts"]
    mods = rc.block_modules(lm.model, v, xs[:1], ts[:1], blocks=blocks)
    return mods, rc.capture_blocks(lm.model, v, xs, ts, blocks)


@pytest.mark.parametrize("name", ["down_1_res_0", "down_1_attn_0", "up_0_res_0"])
def test_ste_path_quantizes_what_the_supernet_quantizes(recon, captured, name):
    """A block through the STE handler matches the same block through
    `quantized_apply` (AQT) up to float accumulation order."""
    reg, qp = recon["reg"], recon["qp"]
    (block,) = [b for b in recon["blocks"] if b.name == name]
    mods, cap = captured
    module, sub = mods[block.prefix], rc._subtree(recon["lm"].params, block.prefix)
    inputs, ref = cap[block.prefix]
    inputs = jax.tree.map(lambda a: a[::2], inputs)
    ref = ref[::2]
    v = {"params": sub}
    block_reg = build_registry(module, v, *inputs)  # paths relative to the block
    assert [("/".join(block.prefix + p.path)) for p in block_reg] == [
        reg[i].name for i in block.layers
    ]
    ix = np.asarray(block.layers)
    block_qp = QParams(
        qp.bit_widths, qp.act_bound[ix], tuple(qp.w_clip[i] for i in block.layers)
    )
    local = rc.Block((), tuple(range(len(block_reg))))
    pinned = rc._pinned_bounds(block_qp, block_reg, local)

    @jax.jit
    def both(theta, width):  # one compile for every width
        handler = rc._ste_handler((), block_reg, local.layers, theta, width, pinned)
        with intercept(handler):
            out = module.apply(v, *inputs)
        n = len(block_reg)
        aqt = quantized_apply(
            module, v, *inputs, bits=QuantBits(jnp.full(n, width), jnp.full(n, width)),
            registry=block_reg, qparams=block_qp, candidates=CANDIDATES,
        )  # fmt: skip
        return out, aqt

    for k, width in enumerate(qp.bit_widths):
        out, aqt = both(rc._theta(block_qp, local, k), jnp.int32(width))
        gap = float(jnp.linalg.norm(out - aqt) / jnp.linalg.norm(aqt - ref))
        assert gap < 0.02, (width, gap)  # vs the quantization error itself


def test_reconstruction_never_increases_the_block_objective(recon, captured):
    lm, reg, qp, new = recon["lm"], recon["reg"], recon["qp"], recon["new"]
    assert new.bit_widths == qp.bit_widths
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, qp)
    mods, cap = captured
    changed = 0
    touched = {i for b in recon["blocks"] for i in b.layers}
    for block in recon["blocks"]:
        obj = jax.jit(
            rc.block_objective_fn(
                mods[block.prefix], block, reg, rc._subtree(lm.params, block.prefix)
            )
        )
        inputs, target = cap[block.prefix]
        pinned = rc._pinned_bounds(qp, reg, block)
        for k, b in enumerate(qp.bit_widths):
            width = jnp.int32(b)
            before, after = (
                float(obj(rc._theta(q, block, k), inputs, target, width, pinned))
                for q in (qp, new)
            )
            assert np.isfinite(after) and after <= before, (block.name, b)
            changed += after < before
    assert changed >= 3  # it improves most fits, even in 10 steps
    rows = recon["rinfo"]["fits"]
    assert len(rows) == len(recon["blocks"]) * len(qp.bit_widths)
    assert all(r["mse_reconstruction"] <= r["mse_min_mse"] or r["kept"] == "min-mse"
               for r in rows)  # fmt: skip
    # Layers outside the fitted blocks are untouched.
    for i in set(range(len(reg))) - touched:
        np.testing.assert_array_equal(new.act_bound[i], qp.act_bound[i])
        if qp.w_clip[i] is not None:
            np.testing.assert_array_equal(new.w_clip[i], qp.w_clip[i])
    assert all(c is None or (np.asarray(c) <= 1.0).all() for c in new.w_clip)


def test_reconstructed_calibration_round_trips_with_its_stage(recon, tmp_path):
    reg, new = recon["reg"], recon["new"]
    settings = {"stage": rc.STAGE_RECONSTRUCTION, "reconstruct_steps": 25}
    path = qio.save_calibration(tmp_path / "c", new, reg, CANDIDATES, settings, "fp")
    loaded, meta = qio.load_calibration(path, reg, CANDIDATES, "fp")
    jax.tree.map(np.testing.assert_array_equal, loaded, new)
    assert rc.calibration_stage(meta) == rc.STAGE_RECONSTRUCTION
    assert rc.calibration_stage({"settings": {}}) == rc.STAGE_MIN_MSE
