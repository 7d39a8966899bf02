"""`tmpq compare` / tmpq_jax.compare on tiny shapes: the float model against itself
changes nothing, a 2-bit genome changes the images, bad inputs are one line."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.cli import main
from tmpq_jax.compare import (
    FP_SAME,
    FP_UNIFORM,
    GENOME,
    compare,
    run_compare,
    sample_sets,
)
from tmpq_jax.data import load_splits
from tmpq_jax.errors import UserError
from tmpq_jax.evaluation import Evaluator
from tmpq_jax.genome_file import genome_to_dict, write_genome
from tmpq_jax.metrics import compute_reference_stats
from tmpq_jax.metrics.classifier import ClassifierConfig, init_params
from tmpq_jax.metrics.feature_net import FeatureNet
from tmpq_jax.quant import QuantBits
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.quant.calibration_io import save_calibration
from tmpq_jax.quant.supernet import QParams
from tmpq_jax.sampling import LoadedModel

pytestmark = pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
NUM, TIMESTEPS, CANDIDATES = 16, [0, 600], (8, 2)


class TinyEps(nn.Module):
    """An 8x8 noise predictor: two convs and a timestep dense (fast to compile)."""

    @nn.compact
    def __call__(self, x, t):
        h = nn.Conv(8, (3, 3), name="conv_in")(x)
        h = h + nn.Dense(8, name="temb")(t[:, None] / 1000.0)[:, None, None]
        return nn.Conv(x.shape[-1], (3, 3), name="conv_out")(nn.silu(h))


@pytest.fixture(scope="module")
def lm():
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = jax.jit(TinyEps().init)(jax.random.key(1), x, t)["params"]
    return LoadedModel.from_module(TinyEps(), params, image_size=8)


@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    """A 10-class 8x8 classifier (random weights) with the stats of 64 blobs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    cy, cx = rng.uniform(2, 6, (2, 64, 1, 1))
    imgs = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, images=imgs, labels=rng.integers(0, 10, 64))
    cfg = ClassifierConfig(widths=(8,), feature_dim=8, num_groups=4)
    params = init_params(cfg, jax.random.key(3), (8, 8, 1))
    net = FeatureNet(params, cfg, image_shape=(8, 8, 1))
    splits = load_splits(str(path), test_fraction=0.25)
    return Evaluator.from_parts(net, compute_reference_stats(net, splits=splits))


@pytest.fixture(scope="module")
def genome_w2(lm, tmp_path_factory):
    """A W2A2 genome of the tiny model, with its calibration."""
    d = tmp_path_factory.mktemp("genome")
    reg, fp = lm.layer_registry(), model_fingerprint(lm.card)
    k = len(CANDIDATES)  # ranges, not calibrated: |activation| <= 4, no clipping
    clips = [
        None if x.kernel_shape is None else jnp.ones((k, x.kernel_shape[-1]))
        for x in reg
    ]
    qp = QParams(CANDIDATES, jnp.full((len(reg), 2, k), 4.0), tuple(clips))
    calib = save_calibration(d / "calib", qp, reg, CANDIDATES, {}, fp)
    g = genome_to_dict(
        TIMESTEPS,
        QuantBits.uniform(reg, 2, 2),
        reg,
        CANDIDATES,
        calibration=str(calib),
        model_fingerprint=fp,
    )
    return write_genome(d / "w2a2.json", g)


def test_float_model_against_itself_changes_nothing(lm, ev):
    sets = sample_sets(lm, lm, TIMESTEPS, NUM, batch_size=NUM)
    np.testing.assert_array_equal(sets[GENOME], sets[FP_SAME])
    assert not np.array_equal(sets[GENOME], sets[FP_UNIFORM])  # other steps
    r = compare(sets, ev)
    same = r["changes"][FP_SAME]
    for k in ("mean_brightness", "contrast_mean", "contrast_ks", "near_black_fraction"):
        assert same[k] == 0.0, k
    assert same["mean_image_abs_diff_max"] == 0.0 == same["paired_pixel_abs_diff"]
    assert same["class_total_variation"] == 0.0
    assert r["sets"][GENOME]["scores"] == r["sets"][FP_SAME]["scores"]
    assert all(v == 0.0 for v in same["scores"].values()) and "fid" in same["scores"]
    hist = r["sets"][GENOME]["scores"]["class_histogram"]
    assert abs(sum(hist.values()) - 1) < 1e-5


def test_two_bit_genome_changes_the_images(lm, ev, genome_w2, tmp_path):
    r = run_compare(genome_w2, tmp_path / "out", NUM, model=lm, evaluator=ev)
    c = r["changes"][FP_SAME]
    assert c["paired_pixel_abs_diff"] > 0.05, c  # same noise, 2-bit model
    assert c["mean_image_abs_diff_mean"] > 0.01 and c["contrast_ks"] > 0
    assert r["timesteps"] == {
        GENOME: TIMESTEPS,
        FP_SAME: TIMESTEPS,
        FP_UNIFORM: [0, 500],
    }
    assert r["genome_bits"]["mean_a_bits"] < 3  # softmax operands stay 8-bit
    assert r["num_samples"] == NUM
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["changes"] == r["changes"] and saved["device"] and saved["date"]
    png = (tmp_path / "out" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_refuses_bad_inputs_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    shipped = "docs/search_w6a6_seed0_result.json"
    argv = ["compare", "--no-progress", "--out", str(out)]
    assert main([*argv, "--genome", str(tmp_path / "none.json")]) == 2
    assert "no genome file" in _one_line(capsys)
    assert main([*argv, "--genome", shipped, "--num", "10"]) == 2
    assert "at least 129" in _one_line(capsys)
    (tmp_path / "f").write_text("")
    assert main(["compare", "--genome", shipped, "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in _one_line(capsys)
    assert not out.exists()


def test_a_full_precision_genome_is_refused_before_any_work(tmp_path):
    g = tmp_path / "fp.json"
    g.write_text('{"format": "tmpq-genome/1", "full_precision": true}')
    with pytest.raises(UserError, match="full-precision genome") as e:
        run_compare(g, tmp_path / "out", NUM)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
