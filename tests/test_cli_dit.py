"""`tmpq train` / `tmpq sample` of a class-conditional DiT, and the one-line
refusals between flow-matching and noise-prediction models."""

import pytest

from tmpq_jax.cli import main


@pytest.fixture(scope="module")
def dit(tiny_npz, tmp_path_factory):
    wd = tmp_path_factory.mktemp("dit")
    tiny = [
        f"--config.data.name={tiny_npz}",
        "--config.model.image_size=16",
        "--config.model.patch=4",
        "--config.model.width=16",
        "--config.model.depth=1",
        "--config.model.heads=2",
        "--config.model.num_classes=2",
        "--config.model.time_embed_dim=16",
        "--config.train.num_steps=2",
        "--config.train.steps_per_call=2",
        "--config.train.batch_size=8",
        "--config.train.warmup_steps=1",
    ]
    argv = ["train", "--config", "configs/fmnist_dit.py", "--workdir", str(wd)]
    assert main([*argv, "--no-progress", *tiny]) == 0
    return wd / "model"


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_sample_a_class_with_guidance(dit, tmp_path):
    out = tmp_path / "g.png"
    argv = ["sample", "--checkpoint", str(dit), "--class", "1", "--guidance", "2.0"]
    argv += ["--steps", "2", "--num", "3", "--batch-size", "2", "--solver", "heun"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()


def test_flow_and_noise_models_refuse_each_others_options(dit, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    dit_argv = ["sample", "--checkpoint", str(dit), "--out", out, "--num", "2"]
    _one_line_error(
        capsys, [*dit_argv, "--class", "5"], "outside the model's label set"
    )
    _one_line_error(capsys, [*dit_argv, "--schedule", "quad"], "needs a eps-prediction")
    unet = ["sample", "--out", out, "--num", "2"]
    _one_line_error(
        capsys, [*unet, "--guidance", "2"], "unconditional noise-prediction"
    )
    _one_line_error(capsys, [*unet, "--solver", "heun"], "needs a velocity-prediction")
