"""`tmpq sample --genome`: the shipped model SERVE'd from int8 weights, and bad genomes."""

import json
import re

import numpy as np
import pytest

from tmpq_jax.cli import main
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.genome_file import genome_to_dict, write_genome
from tmpq_jax.quant import QuantBits, unet_registry
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.sampling import load_model

pytestmark = pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
TIMESTEPS = timestep_schedule("quad", 10, 1000)  # what `--steps 10` samples


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    """A W8A8 genome of the shipped model over the 10-step quad schedule."""
    lm = load_model()
    reg = unet_registry(lm.config)
    d = genome_to_dict(
        TIMESTEPS,
        QuantBits.uniform(reg, 8, 8),
        reg,
        (8, 7, 6, 5),
        calibration="checkpoints/fmnist_unet_calib",
        model_fingerprint=model_fingerprint(lm.card),
        fid=None,
    )
    path = write_genome(tmp_path_factory.mktemp("genome") / "result.json", d)
    return path, d


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _sample(*args):
    return main(["sample", "--num", "4", "--no-progress", *map(str, args)])


def test_sample_from_genome_int8_close_to_float(genome, tmp_path):
    path, _ = genome
    q, f, png = tmp_path / "q.npz", tmp_path / "f.npz", tmp_path / "q.png"
    assert _sample("--genome", path, "--npz", q, "--out", png) == 0
    assert _sample("--steps", "10", "--npz", f) == 0
    assert png.stat().st_size > 0
    with np.load(q) as zq, np.load(f) as zf:
        assert list(zq["timesteps"]) == list(TIMESTEPS) == list(zf["timesteps"])
        iq, if_ = zq["images"].astype(np.float32), zf["images"].astype(np.float32)
    assert iq.shape == (4, 28, 28, 1)
    # W8A8 changes the samples a little, not a lot (same seed, same noise;
    # measured 1.6%; with 2 steps the difference is amplified to ~13%).
    diff = np.abs(iq - if_).mean() / 255
    assert 0 < diff < 0.05, diff


def _bad(d, what):
    d = json.loads(json.dumps(d))
    match what:
        case "unknown":
            d["layers"]["down_9/conv"] = {"w_bits": 8, "a_bits": 8}
        case "bits":
            d["layers"]["conv_in"]["w_bits"] = 4
        case "length":
            d["layers"].pop("conv_out")
        case "model":
            d["model_fingerprint"] = "0123456789abcdef"
        case "calibration":
            d["calibration"] = "nowhere/calib"
        case "timesteps":
            d["timesteps"] = [0, 500, 500]
    return d


@pytest.mark.parametrize(
    "what, msg",
    [
        ("unknown", "unknown layer name 'down_9/conv'.*tmpq layers"),
        ("bits", "w_bits 4, outside the candidate set"),
        ("length", "missing 'conv_out'"),
        ("model", "searched on model 0123456789abcdef"),
        ("calibration", "calibration 'nowhere/calib' is not found"),
        ("timesteps", "not strictly ascending"),
    ],
)
def test_bad_genome_is_refused_in_one_line(genome, tmp_path, capsys, what, msg):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_bad(genome[1], what)))
    out = tmp_path / "g.png"
    assert _sample("--genome", bad, "--out", out) == 2
    assert re.search(msg, _err(capsys))
    assert not out.exists()


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--steps", "5"], "--steps: a --genome carries its own timesteps"),
        (["--dtype", "bfloat16"], "--dtype: the int8 model samples in float32"),
    ],
)
def test_genome_conflicting_flags(genome, tmp_path, capsys, args, msg):
    assert _sample("--genome", genome[0], *args, "--out", tmp_path / "g.png") == 2
    assert msg in _err(capsys)


def test_missing_genome_file(tmp_path, capsys):
    assert _sample("--genome", tmp_path / "none.json", "--out", tmp_path / "g.png") == 2
    assert "no genome file" in _err(capsys)
