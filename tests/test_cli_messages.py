"""The library's errors name its functions' arguments; the CLI rewords them to name
its own flags. Every refusal is one line."""

import pytest

from tmpq_jax.cli import main
from tmpq_jax.diffusion.schedules import timestep_schedule, uniform_timesteps
from tmpq_jax.errors import ArgumentError, UserError
from tmpq_jax.serving import resolve_calibration


def test_library_errors_name_arguments(tmp_path):
    with pytest.raises(ArgumentError, match=r"^num_steps=0: use 1 to 1000 sampling"):
        uniform_timesteps(0)
    with pytest.raises(UserError, match=r"^num_steps=1001: "):
        timestep_schedule("quad", 1001)
    with pytest.raises(ArgumentError, match=r"pass calibration=DIR\.$") as e:
        resolve_calibration("nowhere/calib", tmp_path / "genome.json")
    assert e.value.renamed("--calibration").args[0].endswith("pass --calibration=DIR.")
    assert e.value.arg == "calibration" and isinstance(e.value, UserError)


def test_renaming_names_every_argument_it_knows():
    e = ArgumentError("checkpoint", "pass {arg}=DIR (or {model_spec}=F), not {'a': 1}.")
    assert str(e) == "pass checkpoint=DIR (or model_spec=F), not {'a': 1}."
    flags = {"checkpoint": "--checkpoint", "model_spec": "--model"}
    assert (
        str(e.renamed(flags)) == "pass --checkpoint=DIR (or --model=F), not {'a': 1}."
    )
    assert str(e.renamed({})) == str(e) and e.renamed(flags).arg == "checkpoint"


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--steps", "0"], "--steps=0: use 1 to 1000 sampling steps."),
        (["--steps", "1", "--num", "0"], "--num=0: ask for at least one image."),
    ],
)
def test_the_cli_names_its_flags(tmp_path, capsys, flags, expect):
    out = tmp_path / "g.png"
    assert main(["sample", *flags, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tmpq sample: error: {expect}" and not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--out", "x.png"],
        ["eval"],
        ["compare", "--genome", "g.json"],
        ["layers"],
        ["calibrate", "--out", "calib"],
        ["export", "--genome", "g.json", "--out", "exported"],
    ],
)
def test_a_command_without_a_config_refuses_overrides_before_any_work(
    tmp_path, capsys, monkeypatch, argv
):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--config.search.seed=1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tmpq {argv[0]}: error: `tmpq {argv[0]}` takes no --config overrides "
        "(got 'search.seed=1').\n"
    )
    assert not any(tmp_path.iterdir())  # nothing written
