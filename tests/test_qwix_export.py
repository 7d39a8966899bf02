"""Qwix export (`quant/qwix_export.py`): the Qwix-served model against SERVE.

Every case goes through the files: `to_qwix` -> `save_qwix_export` ->
`load_qwix_export`, which serves with stock `qwix.PtqProvider` and nothing of
tmpq_jax's numerics; the reference is `export.serve_apply` (AQT SERVE).
"""

import json
import math
import re
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmpq_jax.errors import UserError
from tmpq_jax.models.nnx_model import NNXModel
from tmpq_jax.models.ops import MatMul
from tmpq_jax.quant import QParams, QuantBits, build_registry
from tmpq_jax.quant import numerics as qn
from tmpq_jax.quant import qwix_export as qx
from tmpq_jax.quant import qwix_files as qf
from tmpq_jax.quant.calibration import collect_activation_stats
from tmpq_jax.quant.export import convert, serve_apply

sys.path.insert(0, str(Path(__file__).parent))
from byo_models import timestep_features  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
        "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix"),  # nnx aliases
]
CANDIDATES = (8, 7, 6, 5, 4)
# Stated tolerances. Exact (float rounding) wherever no activation lies below its
# calibrated range; below it Qwix's grid has one more step (-2**(b-1)), so with
# clipping ranges the mean |Qwix - SERVE| stays under this fraction of the mean
# |SERVE - float| (measured 0.02-0.08 here; 0.29-0.34 on the shipped UNet with
# its min-MSE calibration, where Qwix and SERVE are equally far from float:
# docs/qwix.md).
EXACT_RTOL = 1e-5  # of max |SERVE|
CLIPPED_DRIFT = 0.25


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, temb):
        y = nn.Conv(8, (3, 3), name="conv")(nn.silu(h))
        return h + y + nn.Dense(8, name="temb")(temb)[:, None, None]


class TinyLinen(nn.Module):
    """The UNet's kinds of ops: convs (one nested), dense, attention through the
    UNet's own `MatMul` modules (q.k, and p.v with a softmax operand)."""

    @nn.compact
    def __call__(self, x, t):
        temb = timestep_features(t)
        h = _Block(name="block")(nn.Conv(8, (3, 3), name="conv_in")(x), temb)
        b, hh, ww, c = h.shape
        qkv = nn.Dense(3 * c, name="qkv")(h.reshape(b, hh * ww, c))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        p = jax.nn.softmax(MatMul("bld,bmd->blm", name="qk")(q, k) / math.sqrt(c))
        h = h + MatMul("blm,bmd->bld", name="av")(p, v).reshape(h.shape)
        return nn.Conv(1, (3, 3), name="conv_out")(nn.silu(h))


def _setup(model, variables, x, t, tmp, module=None):
    """The model, its registry and measured activation absmax, warmed up: one
    genome served by both (op by op: later genomes reuse the compiled ops)."""
    reg = build_registry(model, variables, x, t)
    stats = collect_activation_stats(model, variables, reg, x, t, jax.random.key(0))
    absmax = np.zeros((len(reg), 2), np.float32)
    for (i, j), (m, _) in stats.items():
        absmax[i, j] = m
    s = dict(model=model, params=variables["params"], reg=reg, x=x, t=t)
    s.update(absmax=absmax, module=module)
    serve_both(s, genome(reg, (8, 8), (8, 8), 8), qparams(s, 1.0), tmp)
    return s


def _inputs():
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    return x, jnp.array([3, 700], jnp.int32)


@pytest.fixture(scope="module")
def linen(tmp_path_factory):
    model, (x, t) = TinyLinen(), _inputs()
    variables = jax.jit(model.init)(jax.random.key(1), x, t)
    return _setup(model, variables, x, t, tmp_path_factory.mktemp("warm"))


def qparams(s, ratio, bias_corr=False, seed=0):
    """Activation ranges at `ratio` x the measured absmax (>= 2: nothing clipped),
    per-channel weight clip ratios in [0.5, 1], optional bias corrections."""
    rng = np.random.default_rng(seed)
    k, reg = len(CANDIDATES), s["reg"]
    act = np.repeat((ratio * s["absmax"])[:, :, None], k, axis=2)
    shapes = [x.kernel_shape for x in reg]
    clips = tuple(
        None if c is None else jnp.asarray(rng.uniform(0.5, 1, (k, c[-1])), jnp.float32)
        for c in shapes
    )
    corr = tuple(
        None
        if c is None
        else jnp.asarray(rng.normal(0, 0.05, (k, k, c[-1])), jnp.float32)
        for c in shapes
    )
    return QParams(CANDIDATES, jnp.asarray(act), clips, corr if bias_corr else None)


def genome(reg, conv, dense, matmul):
    """Bits by kind: conv / dense (w, a); attention matmuls at `matmul` bits (q.k
    both operands; p.v's value operand, its softmax one being held at 8)."""
    w, a = [], []
    for x in reg:
        if x.kind == "matmul":
            w.append(8 if x.pinned_lhs_bits else matmul)
            a.append(matmul)
        else:
            w.append((conv if x.kind == "conv" else dense)[0])
            a.append((conv if x.kind == "conv" else dense)[1])
    return QuantBits(jnp.asarray(w, jnp.int32), jnp.asarray(a, jnp.int32))


def serve_both(s, bits, qp, tmp_path, **kw):
    """(Qwix's output, SERVE's output, the export) for one genome, through files."""
    qmodel = convert(s["params"], s["reg"], bits, qp, CANDIDATES)
    x, t = s["x"], s["t"]
    ref = serve_apply(s["model"], qmodel, x, t, registry=s["reg"])
    export = qx.to_qwix(s["model"], qmodel, s["reg"], (x[:1], t[:1]), **kw)
    out = qf.save_qwix_export(tmp_path / "qwix", export, {"note": "test"})
    if s["module"] is not None:  # NNX: Qwix's own process_prequantized_params
        return qf.load_qwix_export(out, s["module"], x[:1], t[:1])(x, t), ref, export
    qm, variables = qf.load_qwix_export(out, s["model"])
    return qm.apply(variables, x, t), ref, export


# (conv (w, a), dense (w, a), attention matmul bits): what each case exercises.
WIDTHS = {
    "int8": ((8, 8), (8, 8), 8),
    "int4_weights": ((4, 8), (4, 8), 8),  # conv: 4-bit grid in int8; dense: int4
    "int4_dense_acts": ((8, 8), (4, 4), 8),  # int4 x int4 dot avoided: int8 kernel
    "emulated": ((6, 6), (5, 7), 7),  # Qwix's int5/int6/int7
    "mixed": ((5, 7), (7, 5), 6),
}


@pytest.mark.parametrize("case", list(WIDTHS))
def test_qwix_equals_serve_when_no_activation_is_clipped(linen, case, tmp_path):
    """Ranges at 2x the absmax; "mixed" also folds a bias correction into biases."""
    bits = genome(linen["reg"], *WIDTHS[case])
    qp = qparams(linen, 2.0, bias_corr=case == "mixed")
    y, ref, export = serve_both(linen, bits, qp, tmp_path)
    tol = EXACT_RTOL * float(jnp.abs(ref).max())
    assert tol > 0
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)
    assert all(r["served"] == "qwix" for r in export.layers)


@pytest.mark.parametrize("bits", range(2, 9))
def test_qwix_activation_grid_has_one_more_negative_step(bits):
    """Qwix's b-bit grid is -2**(b-1) .. 2**(b-1)-1, AQT's +-(2**(b-1)-1), on the
    same scale: values below the range are one step apart, all others equal."""
    import qwix

    x = jnp.linspace(-3.0, 3.0, 2001, dtype=jnp.float32)
    bound = 1.7
    ours, _ = qn.fake_quant_activation(x, qn.ActQuant(bits, bound))
    method = f"fixed,{-bound},{bound}"
    qa = qwix.quantize(x, qx.qtype(qx.qtype_name(bits)), calibration_method=method)
    theirs = np.asarray(qwix.dequantize(qa))
    step = bound / (2 ** (bits - 1) - 0.5)
    below = np.asarray(x) / step < -(2 ** (bits - 1) - 0.5)
    assert below.any() and (~below).any()
    np.testing.assert_allclose(theirs[~below], ours[~below], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose((theirs - ours)[below], -step, rtol=1e-5)


def test_qwix_close_to_serve_with_clipped_ranges(linen, tmp_path):
    """Ranges at 0.6x the absmax, as min-MSE calibration clips: the values below
    them move the output by a small fraction of what quantization moves it."""
    fp = linen["model"].apply({"params": linen["params"]}, linen["x"], linen["t"])
    for case in ("int8", "emulated"):
        bits = genome(linen["reg"], *WIDTHS[case])
        y, ref, _ = serve_both(linen, bits, qparams(linen, 0.6), tmp_path / case)
        drift, quant = jnp.abs(y - ref).mean(), jnp.abs(ref - fp).mean()
        assert float(drift) < CLIPPED_DRIFT * float(quant), (case, drift, quant)


def test_one_rule_per_layer_with_the_genome_widths(linen):
    reg = linen["reg"]
    bits = genome(reg, (5, 7), (4, 8), 6)
    qmodel = convert(linen["params"], reg, bits, qparams(linen, 1.0), CANDIDATES)
    args = (linen["x"][:1], linen["t"][:1])
    export = qx.to_qwix(linen["model"], qmodel, reg, args)
    rules = {r["module_path"]: r for r in export.rules}
    assert sorted(rules) == sorted(re.escape("/".join(x.site.path)) for x in reg)
    qtypes = {p: (r["weight_qtype"], r["act_qtype"]) for p, r in rules.items()}
    # A conv's rule has one qtype for both operands (Qwix's); its kernel keeps
    # its own 5-bit grid, in the int8 container.
    assert qtypes["conv_in"] == qtypes["block/conv"] == ("int7", "int7")
    assert rules["conv_in"]["act_calibration_method"].startswith("fixed,-")
    assert qtypes["block/temb"] == qtypes["qkv"] == ("int4", "int8")
    assert qtypes["qk"] == ("int6", "int6") and qtypes["av"] == ("int8", "int8")
    kernel = np.asarray(qmodel.variables["params"]["conv_in"]["kernel"])
    np.testing.assert_array_equal(export.arrays["conv_in/kernel/array/qvalue"], kernel)
    assert int(np.abs(kernel).max()) == 2 ** (5 - 1) - 1


# ----------------------------------------------------------------------------
# NNX.


class _MatMul(nnx.Module):
    def __init__(self, equation: str):
        self.equation = equation

    def __call__(self, a, b):
        return jnp.einsum(self.equation, a, b)


class TinyNNX(nnx.Module):
    """Conv, Linear (time), attention as two einsum modules, Conv."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv_in = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.temb = nnx.Linear(8, 8, rngs=rngs)
        self.qkv = nnx.Linear(8, 24, rngs=rngs)
        self.qk = _MatMul("bld,bmd->blm")
        self.av = _MatMul("blm,bmd->bld")
        self.conv_out = nnx.Conv(8, 1, (3, 3), rngs=rngs)

    def __call__(self, x, t):
        h = self.conv_in(x) + self.temb(timestep_features(t))[:, None, None]
        b, hh, ww, c = h.shape
        q, k, v = jnp.split(self.qkv(h.reshape(b, hh * ww, c)), 3, axis=-1)
        p = jax.nn.softmax(self.qk(q, k) / math.sqrt(c), axis=-1)
        h = h + self.av(p, v).reshape(h.shape)
        return self.conv_out(nn.silu(h))


@pytest.fixture(scope="module")
def tiny_nnx(tmp_path_factory):
    module = TinyNNX(nnx.Rngs(0))
    model, (x, t) = NNXModel(module), _inputs()
    tmp = tmp_path_factory.mktemp("warm")
    return _setup(model, {"params": model.params}, x, t, tmp, module)


def test_nnx_model_served_by_qwix_equals_serve(tiny_nnx, tmp_path):
    s = tiny_nnx
    bits = genome(s["reg"], (6, 8), (4, 5), 8)
    y, ref, export = serve_both(s, bits, qparams(s, 2.0), tmp_path)
    assert {r["module_path"] for r in export.layers} >= {"conv_in", "qk", "av"}
    np.testing.assert_allclose(
        y, ref, rtol=0, atol=EXACT_RTOL * float(jnp.abs(ref).max())
    )


# ----------------------------------------------------------------------------
# What Qwix cannot serve, and bad inputs: one line each, nothing written.


def _refused(fn, match, out=None):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    if out is not None:
        assert not out.exists()


def test_refusals_write_nothing(linen, tmp_path):
    reg, out = linen["reg"], tmp_path / "out"
    qp = qparams(linen, 1.0)

    def export(bits, **kw):
        qmodel = convert(linen["params"], reg, bits, qp, CANDIDATES)
        args = (linen["x"][:1], linen["t"][:1])
        e = qx.to_qwix(linen["model"], qmodel, reg, args, **kw)
        return qf.save_qwix_export(out, e)

    # 4-bit conv activations: Qwix's conv would run int4 x int4, which XLA rejects.
    _refused(lambda: export(genome(reg, (8, 4), (8, 8), 8)), "int4 convolutions", out)
    # Attention operands at different widths (q.k at 8 and 6 bits).
    bits = genome(reg, (8, 8), (8, 8), 6)
    bits = QuantBits(bits.w_bits, jnp.where(bits.w_bits == 6, 8, bits.a_bits))
    _refused(lambda: export(bits), "at 8 and 6 bits", out)
    # ... or served in float, and said so.
    export(bits, matmul_fallback="float")
    meta, _ = qf.read_qwix_export(out)
    floats = [r for r in meta["layers"] if r["served"] == "float"]
    assert floats and all("float:" in r["note"] for r in floats)
    # An existing, non-empty directory is never written over.
    before = sorted(p.name for p in out.iterdir())
    _refused(lambda: export(genome(reg, (8, 8), (8, 8), 8)), "exists and is not empty")
    assert sorted(p.name for p in out.iterdir()) == before
    # Dynamic activation ranges (Qwix's dynamic scales are per row).
    dyn = convert(linen["params"], reg, genome(reg, (8, 8), (8, 8), 8), None)
    args = (linen["x"][:1], linen["t"][:1])
    _refused(lambda: qx.to_qwix(linen["model"], dyn, reg, args), "dynamic ranges")


def test_qwix_without_a_needed_api_is_one_line(monkeypatch):
    import qwix

    monkeypatch.delattr(qwix, "PtqProvider")
    _refused(qx.check_qwix, r"lacks qwix\.PtqProvider.*pip install qwix==0\.1\.8")


def test_unreadable_export(tmp_path):
    _refused(lambda: qf.read_qwix_export(tmp_path), "no readable Qwix export")
    (tmp_path / qx.META_FILE).write_text(json.dumps({"format": "other"}))
    np.savez(tmp_path / qx.PARAMS_FILE, a=np.zeros(1))
    _refused(lambda: qf.read_qwix_export(tmp_path), "not a tmpq Qwix export")


# ----------------------------------------------------------------------------
# `tmpq export`.

FACTORY = """
import jax
from test_qwix_export import TinyLinen, _inputs

def tiny():
    model, (x, t) = TinyLinen(), _inputs()
    params = model.init(jax.random.key(1), x, t)["params"]
    return model, params, {"image_size": 8, "channels": 1}
"""


def test_cli_export_both_formats_and_one_line_refusals(linen, tmp_path, capsys):
    from tmpq_jax.cli import main
    from tmpq_jax.genome_file import genome_to_dict, write_genome
    from tmpq_jax.quant.calibration import model_fingerprint
    from tmpq_jax.quant.calibration_io import save_calibration
    from tmpq_jax.user_model import load_user_model

    (tmp_path / "tiny_factory.py").write_text(FACTORY)
    spec = f"{tmp_path / 'tiny_factory.py'}:tiny"
    lm = load_user_model(spec)
    reg, fp = lm.layer_registry(), model_fingerprint(lm.card)
    assert reg.names == linen["reg"].names
    calib = save_calibration(
        tmp_path / "calib", qparams(linen, 1.0), reg, CANDIDATES, {}, fp
    )
    bits = genome(reg, (6, 8), (4, 8), 8)
    d = genome_to_dict(
        [0, 500], bits, reg, CANDIDATES, calibration=str(calib), model_fingerprint=fp
    )
    g = write_genome(tmp_path / "result.json", d)

    def export(out, *flags, model=("--model", spec)):
        argv = ["export", "--genome", str(g), "--out", str(out), *model, *flags]
        return main(argv)

    def one_line(code, match):
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and match in err, err

    assert export(tmp_path / "q", "--format", "qwix") == 0
    meta, arrays = qf.read_qwix_export(tmp_path / "q")
    assert meta["genome"]["layers"] == d["layers"] and len(meta["rules"]) == len(reg)
    assert export(tmp_path / "a") == 0  # --format aqt, the default
    assert (tmp_path / "a" / "export.json").is_file()
    before = sorted(p.name for p in (tmp_path / "q").iterdir())
    one_line(export(tmp_path / "q", "--format", "qwix"), "exists and is not empty")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == before
    # The genome was searched on this tiny model, not the shipped one.
    one_line(export(tmp_path / "x", "--format", "qwix", model=()), "searched on model")
    one_line(export(tmp_path / "x", "--matmul-fallback", "float"), "--format qwix only")
    assert not (tmp_path / "x").exists()
