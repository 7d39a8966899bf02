"""AQT CONVERT/SERVE of a genome (int8 kernels + scales) and the genome file."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.errors import UserError
from tmpq_jax.genome_file import FORMAT, genome_to_dict, read_genome, write_genome
from tmpq_jax.models.unet import UNet
from tmpq_jax.quant import (
    QParams,
    QuantBits,
    build_registry,
    cost,
    quantized_apply,
    unet_registry,
)
from tmpq_jax.quant import numerics as qn
from tmpq_jax.quant.export import (
    convert,
    freeze,
    load_quantized,
    save_quantized,
    serve_apply,
)

pytestmark = pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
CANDIDATES = (8, 6, 4, 3)  # wide spread, so every width is exercised


def synthetic_qparams(reg, seed=0):
    """Stored results as calibration would give them: positive activation bounds,
    per-channel clip ratios in [0.5, 1] and bias corrections for every layer at
    every width (pair)."""
    rng = np.random.default_rng(seed)
    k = len(CANDIDATES)
    act = rng.uniform(0.3, 3.0, (len(reg), 2, k)).astype(np.float32)
    clips = tuple(
        None
        if layer.kernel_shape is None
        else jnp.asarray(
            rng.uniform(0.5, 1.0, (k, layer.kernel_shape[-1])), jnp.float32
        )
        for layer in reg
    )
    corr = tuple(
        None
        if layer.kernel_shape is None
        else jnp.asarray(
            rng.normal(0.0, 0.05, (k, k, layer.kernel_shape[-1])), jnp.float32
        )
        for layer in reg
    )
    return QParams(CANDIDATES, jnp.asarray(act), clips, corr)


def mixed_genome(reg, seed=1):
    rng = np.random.default_rng(seed)
    pick = lambda: jnp.asarray(rng.choice(CANDIDATES, len(reg)), jnp.int32)
    return QuantBits(w_bits=pick(), a_bits=pick())


@pytest.fixture(scope="module")
def setup(tiny_cfg, tiny_params):
    model, reg = UNet(tiny_cfg), unet_registry(tiny_cfg)
    x = jax.random.normal(jax.random.key(5), (3, 16, 16, 1))
    t = jnp.array([3, 400, 999])
    qparams, bits = synthetic_qparams(reg), mixed_genome(reg)

    def fake(b, q):
        v = {"params": tiny_params}
        return quantized_apply(
            model, v, x, t, bits=b, registry=reg, qparams=q, candidates=CANDIDATES
        )

    serve = jax.jit(lambda qm: serve_apply(model, qm, x, t, registry=reg))
    return dict(
        model=model,
        reg=reg,
        params=tiny_params,
        qparams=qparams,
        bits=bits,
        fake=jax.jit(fake),
        serve=serve,
        inputs=(x, t),
        qmodel=convert(tiny_params, reg, bits, qparams, CANDIDATES),
    )


# --- CONVERT / SERVE --------------------------------------------------------------------


def test_serve_equals_fake_quant_exactly(setup):
    """Same AQT ops on the same int8 qvalues and scales: bit-identical outputs."""
    s = setup
    want = s["fake"](s["bits"], s["qparams"])
    got = s["serve"](s["qmodel"])
    np.testing.assert_array_equal(got, want)
    # ... and the genome matters: another genome's SERVE differs.
    other = convert(
        s["params"], s["reg"], mixed_genome(s["reg"], 7), s["qparams"], CANDIDATES
    )
    assert float(jnp.abs(s["serve"](other) - want).max()) > 1e-3


def test_traced_freeze_under_vmap_equals_fake_quant_per_genome(setup):
    """The search's path: CONVERT with traced bits, vmapped over a population, then
    SERVE == each genome's fake-quant output, bit for bit."""
    s = setup
    pop = [s["bits"], mixed_genome(s["reg"], 7), mixed_genome(s["reg"], 9)]
    stacked = jax.tree.map(lambda *b: jnp.stack(b), *pop)
    frozen = jax.jit(
        jax.vmap(lambda b: freeze(s["params"], s["reg"], b, s["qparams"]))
    )(stacked)
    got = jax.vmap(s["serve"])(frozen)
    for i, b in enumerate(pop):
        np.testing.assert_array_equal(got[i], s["fake"](b, s["qparams"]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8])
def test_integer_convs_equal_the_float32_path(setup, dtype):
    """Integer operands (|q| <= 127) are exact in bfloat16 (products summed in
    float32) and in int8 (summed in int32): both SERVE convs give AQT's float32
    output."""
    s = setup
    fn = jax.jit(
        lambda qm: serve_apply(
            s["model"], qm, *s["inputs"], registry=s["reg"], conv_dtype=dtype
        )
    )
    np.testing.assert_array_equal(fn(s["qmodel"]), s["serve"](s["qmodel"]))


class ToyNet(nn.Module):  # a second architecture: circular/depthwise convs, dense
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), padding="CIRCULAR", name="conv")(x))
        h = nn.Conv(4, (3, 3), feature_group_count=4, strides=2, name="dw")(h)
        return nn.Dense(3, name="head")(h.reshape(h.shape[0], -1))


def test_serve_equals_fake_quant_with_dynamic_activation_ranges():
    """No QParams (dynamic absmax activations, plain absmax weights), another model."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
    v = ToyNet().init(jax.random.key(1), x)
    reg = build_registry(ToyNet(), v, x)
    bits = QuantBits(jnp.array([3, 8, 5], jnp.int32), jnp.array([6, 4, 7], jnp.int32))
    qm = convert(v["params"], reg, bits, None, (8, 7, 6, 5, 4, 3))
    assert qm.act_bound is None
    cands = (8, 7, 6, 5, 4, 3)
    fake = jax.jit(
        lambda b: quantized_apply(
            ToyNet(), v, x, bits=b, registry=reg, candidates=cands
        )
    )
    serve = jax.jit(lambda q: serve_apply(ToyNet(), q, x, registry=reg))
    np.testing.assert_array_equal(serve(qm), fake(bits))


def test_kernels_are_int8_in_range_and_dequantize_to_the_fake_quant_weights(setup):
    s, reg = setup, setup["reg"]
    params, scales = s["qmodel"].variables["params"], s["qmodel"].variables["aqt"]
    w_bits = np.asarray(s["bits"].w_bits)
    n_kernels = 0
    checked = {"conv_in", "temb0", "mid_attn/proj"}  # eager AQT: a few layers only
    for i, layer in enumerate(reg):
        if layer.kernel_shape is None:
            continue
        n_kernels += 1
        node, fnode = params, s["params"]
        for p in layer.param_path:
            node, fnode = node[p], fnode[p]
        q, scale = node, scales[f"{i:04d}"]["scale"]
        assert q.dtype == jnp.int8 and q.shape == layer.kernel_shape, layer.name
        assert scale.dtype == jnp.float32 and scale.shape == (layer.kernel_shape[-1],)
        bound = 2 ** (int(w_bits[i]) - 1) - 1
        qa = np.abs(np.asarray(q, np.int32))
        assert qa.max() == bound, layer.name  # clipped channels reach the bound
        if layer.name not in checked:
            continue
        # q * scale is the fake-quant weight of the TRAIN path, to the bit.
        k = CANDIDATES.index(int(w_bits[i]))
        spec = qn.WeightQuant(int(w_bits[i]), s["qparams"].w_clip[i][k])
        fq, _ = qn.fake_quant_weight(fnode, spec)
        np.testing.assert_array_equal(np.asarray(q, np.float32) * np.asarray(scale), fq)
    assert n_kernels == sum(layer.kind != "matmul" for layer in reg)
    # No float kernel is left anywhere: every 'kernel' leaf is int8.
    kernels = [
        v
        for path, v in jax.tree_util.tree_leaves_with_path(params)
        if jax.tree_util.keystr(path).endswith("['kernel']")
    ]
    assert len(kernels) == n_kernels and all(v.dtype == jnp.int8 for v in kernels)


def test_save_load_round_trip(setup, tmp_path):
    s = setup
    path = save_quantized(tmp_path / "q", s["qmodel"], s["reg"], genome={"x": 1})
    abstract = jax.eval_shape(lambda: s["params"])
    qm, meta = load_quantized(path, s["reg"], abstract)
    assert meta["genome"] == {"x": 1} and meta["bias_corrected"]
    i = s["reg"].index("conv_in")
    assert qm.variables["aqt"][f"{i:04d}"]["bias_corr"].shape == (
        s["reg"][i].kernel_shape[-1],
    )
    np.testing.assert_array_equal(s["serve"](qm), s["serve"](s["qmodel"]))
    with pytest.raises(UserError, match="int8 export"):
        load_quantized(tmp_path / "none", s["reg"], abstract)


def test_serve_refuses_float_params_and_convert_refuses_bad_bits(setup):
    s = setup
    bad = s["qmodel"].replace(variables={"params": s["params"], "aqt": {}})
    with pytest.raises(UserError, match="frozen int8 weight"):
        jax.eval_shape(
            lambda: serve_apply(
                s["model"],
                bad,
                jnp.zeros((1, 16, 16, 1)),
                jnp.zeros((1,), jnp.int32),
                registry=s["reg"],
            )
        )
    with pytest.raises(UserError, match="outside the candidate set"):
        convert(
            s["params"],
            s["reg"],
            QuantBits.uniform(s["reg"], 5, 8),
            s["qparams"],
            CANDIDATES,
        )


# --- the genome file --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reg(tiny_cfg):
    return unet_registry(tiny_cfg)


def _genome(reg, **extra):
    return genome_to_dict(
        [3, 40, 500],
        mixed_genome(reg),
        reg,
        CANDIDATES,
        calibration="calib/x",
        model_fingerprint="abc",
        **extra,
    )


def test_genome_file_round_trip(reg, tmp_path):
    bits = mixed_genome(reg)
    d = _genome(reg, fid=12.5, generation=3)
    assert d["format"] == FORMAT and list(d["layers"]) == list(reg.names)
    assert d["bitops_per_step"] == float(cost.bitops_per_step(bits, reg))
    assert d["total_bitops"] == 3 * d["bitops_per_step"]
    assert d["size_bits"] == float(cost.model_size_bits(bits, reg))
    assert d["layers"]["mid_attn/av"]["a_bits"] == 8  # the pinned softmax width
    path = write_genome(tmp_path / "g.json", d)
    g = read_genome(path, reg)
    np.testing.assert_array_equal(g.timesteps, [3, 40, 500])
    assert g.timesteps.dtype == np.int32 and g.candidates == CANDIDATES
    np.testing.assert_array_equal(g.bits.w_bits, bits.w_bits)
    live = reg.pinned_lhs_bits == 0  # every attention's av: inert gene
    np.testing.assert_array_equal(
        np.asarray(g.bits.a_bits)[live], np.asarray(bits.a_bits)[live]
    )
    assert g.meta["fid"] == 12.5 and g.meta["calibration"] == "calib/x"
    assert g.meta["model_fingerprint"] == "abc"


def test_inert_softmax_gene_accepts_anything(reg, tmp_path):
    d = _genome(reg)
    d["layers"]["mid_attn/av"]["a_bits"] = 13
    path = write_genome(tmp_path / "g.json", d)
    g = read_genome(path, reg)
    assert int(g.bits.a_bits[reg.index("mid_attn/av")]) in CANDIDATES


def _edit(d, what):
    d = json.loads(json.dumps(d))
    first = next(iter(d["layers"]))
    match what:
        case "unknown":
            d["layers"]["nope/conv"] = {"w_bits": 8, "a_bits": 8}
        case "missing":
            del d["layers"][first]
        case "bits":
            d["layers"][first]["w_bits"] = 9
        case "type":
            d["layers"][first]["a_bits"] = "8"
        case "order":
            d["timesteps"] = [3, 500, 40]
        case "range":
            d["timesteps"] = [3, 40, 1000]
        case "format":
            d["format"] = "tmpq-genome/0"
    return d


@pytest.mark.parametrize(
    "what, msg",
    [
        ("unknown", "unknown layer name 'nope/conv'.*tmpq layers"),
        ("missing", "missing 'temb0'"),
        ("bits", "w_bits 9, outside the candidate set"),
        ("type", "integer 'w_bits' and 'a_bits'"),
        ("order", "not strictly ascending"),
        ("range", r"in \[0, 1000\)"),
        ("format", "not 'tmpq-genome/1'"),
    ],
)
def test_bad_genome_one_line_errors(reg, tmp_path, what, msg):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(_edit(_genome(reg), what)))
    with pytest.raises(UserError, match=msg) as e:
        read_genome(path, reg)
    assert "\n" not in str(e.value)


def test_unreadable_genome_files(reg, tmp_path):
    with pytest.raises(UserError, match="no genome file"):
        read_genome(tmp_path / "none.json", reg)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        read_genome(tmp_path / "bad.json", reg)
    with pytest.raises(UserError, match="outside the candidate set"):
        read_genome(write_genome(tmp_path / "g.json", _genome(reg)), reg, (8, 7))


def test_write_genome_is_atomic(reg, tmp_path):
    d = _genome(reg, junk=object())  # not JSON-serialisable
    with pytest.raises(UserError, match="not JSON-serialisable"):
        write_genome(tmp_path / "g.json", d)
    assert not any(tmp_path.iterdir())  # no file, no temp file
    with pytest.raises(UserError, match="outside the candidate set"):
        genome_to_dict([1, 2], QuantBits.uniform(reg, 2, 2), reg, CANDIDATES)
    with pytest.raises(UserError, match="not ascending"):
        genome_to_dict([2, 1], QuantBits.uniform(reg, 8, 8), reg, CANDIDATES)
    # The sampler's no-op padding (repeated last step) is written as distinct steps.
    d = genome_to_dict(
        [0, 9, 39, 39, 39], QuantBits.uniform(reg, 8, 8), reg, CANDIDATES
    )
    assert (
        d["timesteps"] == [0, 9, 39] and d["total_bitops"] == 3 * d["bitops_per_step"]
    )
