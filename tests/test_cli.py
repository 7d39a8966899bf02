"""The `tmpq` command line end to end on tiny data: train, sample, and bad input."""

import json

import numpy as np
import pytest

from tmpq_jax.cli import main

SMOKE = "configs/smoke.py"


def _tiny_overrides(npz):
    return [
        f"--config.data.name={npz}",
        "--config.model.image_size=16",
        "--config.model.attn_resolutions=(8,)",
        "--config.train.num_steps=2",
        "--config.train.steps_per_call=2",
    ]


@pytest.fixture(scope="module")
def trained(tiny_npz, tmp_path_factory):
    wd = tmp_path_factory.mktemp("cli")
    assert (
        main(
            [
                "train",
                "--config",
                SMOKE,
                "--workdir",
                str(wd),
                "--no-progress",
                *_tiny_overrides(tiny_npz),
            ]
        )
        == 0
    )
    return wd


def test_train_then_sample(trained, tmp_path):
    card = json.loads((trained / "model" / "card.json").read_text())
    assert card["steps"] == 2 and card["config"]["model"]["image_size"] == 16
    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    rc = main(
        [
            "sample",
            "--checkpoint",
            str(trained / "model"),
            "--num",
            "4",
            "--steps",
            "3",
            "--schedule",
            "uniform",
            "--out",
            str(png),
            "--npz",
            str(npz),
            "--no-progress",
        ]
    )
    assert rc == 0 and png.stat().st_size > 0
    with np.load(npz) as z:
        assert z["images"].shape == (4, 16, 16, 1) and z["images"].dtype == np.uint8
        assert list(z["timesteps"]) == [0, 333, 666]


def test_sample_is_deterministic(trained, tmp_path):
    paths = [tmp_path / f"{i}.npz" for i in range(2)]
    for p in paths:
        main(
            [
                "sample",
                "--checkpoint",
                str(trained / "model"),
                "--num",
                "2",
                "--steps",
                "2",
                "--npz",
                str(p),
                "--no-progress",
            ]
        )
    with np.load(paths[0]) as a, np.load(paths[1]) as b:
        np.testing.assert_array_equal(a["images"], b["images"])


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_unknown_config_key(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--config",
            SMOKE,
            "--workdir",
            str(tmp_path),
            "--config.train.nope=1",
        ]
    )
    assert rc == 2 and "unknown config key 'train.nope'" in _err(capsys)
    assert not any(tmp_path.iterdir())


def test_missing_checkpoint(tmp_path, capsys):
    rc = main(
        [
            "sample",
            "--checkpoint",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "g.png"),
        ]
    )
    assert rc == 2 and "no model checkpoint" in _err(capsys)
    assert not (tmp_path / "g.png").exists()


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained / "model", bad)
    for f in (bad / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 50)
    rc = main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "g.png")])
    assert rc == 2 and "cannot restore params" in _err(capsys)
    assert not (tmp_path / "g.png").exists()


def test_bad_image_size(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--config",
            SMOKE,
            "--workdir",
            str(tmp_path),
            "--config.model.image_size=29",
        ]
    )
    assert rc == 2 and "not divisible" in _err(capsys)


def test_bad_output_suffix(trained, tmp_path, capsys):
    rc = main(
        [
            "sample",
            "--checkpoint",
            str(trained / "model"),
            "--out",
            str(tmp_path / "g.jpg"),
        ]
    )
    assert rc == 2 and ".png" in _err(capsys)


def test_shipped_model_samples(tmp_path):
    """The committed checkpoint loads and samples (CPU, 4 images, 2 steps)."""
    from tmpq_jax.sampling import load_model

    lm = load_model()
    assert lm.card["steps"] >= 10_000 and lm.config.image_size == 28
    npz = tmp_path / "s.npz"
    assert (
        main(
            ["sample", "--num", "4", "--steps", "2", "--npz", str(npz), "--no-progress"]
        )
        == 0
    )
    with np.load(npz) as z:
        imgs = z["images"]
    # Trained samples use the whole range: a dark background and bright garments.
    assert imgs.shape == (4, 28, 28, 1)
    assert (imgs < 30).mean() > 0.2 and (imgs > 100).mean() > 0.05


def test_layers_lists_the_shipped_registry(capsys):
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    for name in ("conv_in", "mid_attn/qk", "mid_attn/av", "conv_out", "uniform W6A6"):
        assert name in out


def test_calibrate_writes_a_loadable_calibration(trained, tmp_path, capsys):
    from tmpq_jax.quant import load_calibration, unet_registry
    from tmpq_jax.sampling import load_model

    out = tmp_path / "calib"
    args = [
        "calibrate",
        "--checkpoint",
        str(trained / "model"),
        "--out",
        str(out),
        "--candidates",
        "8,4",
        "--timesteps",
        "2",
        "--samples",
        "2",
        "--bias-correction",
        "--no-progress",
    ]
    assert main(args) == 0
    reg = unet_registry(load_model(trained / "model").config)
    qparams, meta = load_calibration(out, reg, (8, 4))
    assert qparams.act_bound.shape[0] == len(reg) and meta["candidates"] == [8, 4]
    assert meta["settings"]["bias_correction"] and meta["bias_corrected"]
    assert len(qparams.bias_corr) == len(reg)
    capsys.readouterr()
    assert main([*args[:5], "--candidates", "8,9", "--no-progress"]) == 2
    assert "candidate bit-widths" in _err(capsys)


def test_shipped_calibration_matches_the_shipped_model():
    from tmpq_jax.checkpoint import CHECKPOINTS_DIR
    from tmpq_jax.quant import load_calibration, unet_registry
    from tmpq_jax.quant.calibration import model_fingerprint
    from tmpq_jax.sampling import load_model

    lm = load_model()
    reg = unet_registry(lm.config)
    qparams, meta = load_calibration(
        CHECKPOINTS_DIR / "fmnist_unet_calib",
        reg,
        (8, 7, 6, 5),
        model_fingerprint(lm.card),
    )
    # One bound per layer, per operand, per candidate width; the default settings.
    assert qparams.act_bound.shape == (len(reg), 2, 4)
    assert (
        meta["settings"]["num_timesteps"] == 20
        and meta["settings"]["num_samples"] == 32
    )
