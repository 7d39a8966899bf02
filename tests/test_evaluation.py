"""The shipped feature net and `tmpq eval` on the shipped model (CPU, small)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from tmpq_jax.cli import main
from tmpq_jax.data import load_fmnist
from tmpq_jax.evaluation import Evaluator


@pytest.fixture(scope="module", autouse=True)
def optimized_xla():
    # These tests run real-sized forwards (thousands of images), where XLA's
    # optimizations pay for themselves; conftest turns them off for the rest.
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="module")
def ev():
    return Evaluator()


def test_shipped_classifier_accuracy(ev):
    # The card says >= 93% on the 10k test images; check the params on 2000 of them.
    test = load_fmnist("test")
    logits = ev.net.extract(test.images[:2000]).logits
    acc = float(np.mean(logits.argmax(-1) == test.labels[:2000]))
    assert acc >= 0.92, acc


def test_real_images_score_near_floor_and_noise_far(ev):
    train = load_fmnist("train")
    real = ev.score(train.images[:2000])
    noise = ev.score(
        np.random.default_rng(0).integers(0, 256, (2000, 28, 28, 1), np.uint8)
    )
    card = json.loads((Path(ev.net.path) / "card.json").read_text())
    floor = card["fid_floor_train_vs_test"]["2000"]
    assert real["fid"] < floor["mean"] + 4 * floor["std"] + 0.1
    assert noise["fid"] > 50 * real["fid"]
    assert min(real["class_histogram"].values()) > 0.07
    assert real["is"] > 8.0


def test_eval_cli(tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(
        [
            "eval",
            "--num-samples",
            "150",
            "--steps",
            "2",
            "--schedule",
            "uniform",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "FID (FMNIST classifier features)" in text and "class histogram" in text
    r = json.loads(out.read_text())
    assert r["device"] and r["command"].startswith("tmpq eval")
    assert r["num_samples"] == 150 and r["timesteps"] == [0, 500]
    assert np.isfinite(r["fid"]) and abs(sum(r["class_histogram"].values()) - 1) < 1e-5


def test_eval_too_few_samples(capsys):
    rc = main(["eval", "--num-samples", "10", "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "at least 129" in err[0]
