"""Training: the loss falls, and a resumed run equals an uninterrupted one exactly."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import TINY_UNET

from tmpq_jax.config import DataConfig, ExperimentConfig, TrainConfig
from tmpq_jax.diffusion.schedules import DiffusionConfig
from tmpq_jax.errors import UserError
from tmpq_jax.sampling import load_model
from tmpq_jax.train import train


def _cfg(npz, **train_kw):
    tc = dict(
        num_steps=6,
        batch_size=8,
        warmup_steps=2,
        steps_per_call=2,
        ckpt_every=2,
        learning_rate=1e-3,
    )
    tc.update(train_kw)
    return ExperimentConfig(
        TINY_UNET, DiffusionConfig(), DataConfig(str(npz)), TrainConfig(**tc)
    )


def _read_log(workdir):
    import json

    return [
        json.loads(line)
        for line in (workdir / "train_log.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_npz, tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    train(_cfg(tiny_npz), wd, progress=False)
    return wd, load_model(wd / "model")


def test_resume_exact_across_call_splits(tiny_npz, tmp_path, uninterrupted):
    full_dir, full = uninterrupted
    cfg = _cfg(tiny_npz, steps_per_call=3, ckpt_every=3)
    # Interrupt: run to 3 steps with a config whose signature matches, then resume.
    with pytest.raises(KeyboardInterrupt):
        _train_then_interrupt(cfg, tmp_path, stop_after_calls=1)
    train(cfg, tmp_path, progress=False)
    resumed = load_model(tmp_path / "model")
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    losses_full = [r["loss"] for r in _read_log(full_dir)]
    assert losses_full[-1] < losses_full[0]


def _train_then_interrupt(cfg, workdir, stop_after_calls):
    """Runs `train` and raises KeyboardInterrupt after N jitted calls (a Ctrl-C)."""
    import tmpq_jax.train.loop as loop

    real = loop.make_train_steps

    def counting(*a, **k):
        fn = real(*a, **k)
        calls = {"n": 0}

        def wrapped(*args):
            if calls["n"] == stop_after_calls:
                raise KeyboardInterrupt
            calls["n"] += 1
            return fn(*args)

        return wrapped

    loop.make_train_steps = counting
    try:
        train(cfg, workdir, progress=False)
    finally:
        loop.make_train_steps = real


def test_other_config_in_workdir_refused(tiny_npz, uninterrupted):
    wd, _ = uninterrupted
    cfg = _cfg(tiny_npz, learning_rate=5e-4)
    with pytest.raises(UserError, match="train.learning_rate"):
        train(cfg, wd, progress=False)


def test_image_size_mismatch(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(TINY_UNET, image_size=8))
    with pytest.raises(UserError, match="data is 16x16"):
        train(cfg, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir()
    )


def test_resume_ignores_where_the_data_lies(tiny_npz, uninterrupted):
    wd, _ = uninterrupted
    cfg = _cfg(tiny_npz)
    moved = dataclasses.replace(
        cfg, data=DataConfig(str(tiny_npz), data_dir="/elsewhere")
    )
    assert train(moved, wd, progress=False)["steps"] == 6
