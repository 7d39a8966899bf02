"""`benchmarks/qwix_export.py`'s row function on tiny models: Qwix against SERVE
within the stated tolerance per width, and what Qwix cannot serve labelled."""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.qwix_export import compare, parse_widths, uniform_bits
from tmpq_jax.errors import UserError
from tmpq_jax.quant import build_registry
from tmpq_jax.quant.calibration import collect_activation_stats

sys.path.insert(0, str(Path(__file__).parent))
import test_qwix_export as tq  # noqa: E402
from byo_models import timestep_features  # noqa: E402

pytestmark = tq.pytestmark
linen = tq.linen  # the fixture: tests/test_qwix_export.py's tiny UNet-like model
CANDIDATES, EXACT_RTOL, CLIPPED_DRIFT = tq.CANDIDATES, tq.EXACT_RTOL, tq.CLIPPED_DRIFT
qparams = tq.qparams


def row(s, qp, w, a, args=None, repeats=0):
    args = args or (s["x"], s["t"])
    return compare(
        s["model"], s["params"], s["reg"], qp, CANDIDATES, args, w, a, repeats
    )


# (w, a): the words `how` must hold. Ranges at 2x the absmax: nothing is clipped,
# so Qwix equals SERVE to float rounding (EXACT_RTOL) at every width it serves.
SERVED = {(8, 8): "native int8", (4, 8): "native int4", (6, 6): "emulated int6"}


@pytest.mark.parametrize("wa", list(SERVED))
def test_row_matches_serve_within_tolerance(linen, wa):
    r = row(linen, qparams(linen, 2.0), *wa)
    assert r["rel_err"] <= EXACT_RTOL, r
    assert SERVED[wa] in r["how"] and "float" not in r["how"], r["how"]
    assert r["max_abs_err"] <= r["rel_err"] * 1e9  # both present, finite


def test_row_with_clipped_ranges_and_throughput(linen):
    r = row(linen, qparams(linen, 0.6), 6, 6, repeats=1)
    assert r["mean_abs_err"] < CLIPPED_DRIFT * r["serve_vs_float_mean"], r
    assert r["qwix_images_per_s"] > 0 and r["serve_images_per_s"] > 0


def test_a_width_qwix_cannot_serve_is_labelled_refused(linen):
    r = row(linen, qparams(linen, 2.0), 4, 4)
    assert r["how"].startswith("refused: ") and "int4 convolutions" in r["how"]
    assert r["max_abs_err"] is None and r["rel_err"] is None


def test_pv_value_operand_at_8(linen):
    reg = linen["reg"]
    bits = uniform_bits(reg, 6, 6)
    for i, layer in enumerate(reg):
        want = 8 if layer.pinned_lhs_bits else 6
        assert int(bits.w_bits[i]) == want and int(bits.a_bits[i]) == 6


class TinyDiT(nn.Module):
    """The DiT's kinds of ops: a patch conv, adaLN Dense, a label table, and
    Flax's own attention (q.k and p.v: two einsums of one module)."""

    @nn.compact
    def __call__(self, x, t, y=None):
        y = jnp.full(x.shape[:1], 3) if y is None else y
        c = nn.Dense(8, name="t_embed")(timestep_features(t))
        c = c + nn.Embed(4, 8, name="y_embed")(y)
        h = nn.Conv(8, (2, 2), strides=(2, 2), name="patch")(x)
        h = h.reshape(h.shape[0], -1, 8)
        shift, scale = jnp.split(nn.Dense(16, name="adaln")(nn.silu(c)), 2, -1)
        h = h * (1 + scale[:, None]) + shift[:, None]
        h = h + nn.MultiHeadDotProductAttention(2, name="attn")(h)
        return nn.Dense(4, name="out")(h).reshape(x.shape)


@pytest.fixture(scope="module")
def dit():
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    t = jnp.array([3, 700], jnp.int32)
    model = TinyDiT()
    variables = jax.jit(model.init)(jax.random.key(1), x, t)
    reg = build_registry(model, variables, x, t)
    stats = collect_activation_stats(model, variables, reg, x, t, jax.random.key(0))
    absmax = np.zeros((len(reg), 2), np.float32)
    for (i, j), (m, _) in stats.items():
        absmax[i, j] = m
    s = dict(model=model, params=variables["params"], reg=reg, x=x, t=t, absmax=absmax)
    s["args"] = (x, t, jnp.array([1, 3], jnp.int32))  # a label and the null one
    return s


def test_dit_attention_in_one_module(dit):
    """W8A8: both einsums share one int8 rule, Qwix equals SERVE. W6A6: q.k at 6
    and p.v at 8 cannot share a rule, so both are served in float, and said so."""
    qp = qparams(dit, 2.0).replace(w_clip=None)  # DenseGeneral: 3-d kernels
    r8 = row(dit, qp, 8, 8, dit["args"])
    assert r8["rel_err"] <= EXACT_RTOL and r8["how"] == "native int8", r8
    r6 = row(dit, qp, 6, 6, dit["args"])
    assert "float: 2 ops (attn/op_0, attn/op_1" in r6["how"], r6["how"]
    assert r6["rel_err"] > EXACT_RTOL  # SERVE quantizes the matmuls, Qwix does not


def test_parse_widths():
    assert parse_widths("w8a8, W4A8") == [(8, 8), (4, 8)]
    with pytest.raises(UserError, match="w8a8"):
        parse_widths("8,8")
