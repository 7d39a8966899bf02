"""`tmpq search` refuses bad input in one line, before any work and any file."""

import jax
import pytest

from tmpq_jax import compilation_cache
from tmpq_jax.cli import main

CPU = "configs/fmnist_search_cpu.py"


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        # 1 step of W6A6 cannot pay for 10 steps of even W5A5
        ("--config.search.budget_steps=1", "below the cheapest genome"),
        ("--config.search.strategy=hillclimb", "search.strategy='hillclimb'"),
        ("--config.search.seed_w_bits=3", "not in the candidate set"),
        ("--config.search.candidates=(8,8,6)", "distinct widths"),
        ("--config.search.rescore_samples=100", "more samples than the 128"),
        ("--config.search.populaton=8", "populaton"),
    ],
)
def test_bad_search_input_is_one_line_and_writes_nothing(
    tmp_path, capsys, override, expect
):
    wd = tmp_path / "wd"
    assert main(["search", "--config", CPU, "--workdir", str(wd), override]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err
    assert not wd.exists()


def test_budget_refusal_names_the_minimum(tmp_path, capsys):
    wd = tmp_path / "wd"
    args = ["search", "--config", CPU, "--workdir", str(wd)]
    assert main([*args, "--config.search.budget_steps=1"]) == 2
    assert "raise the budget to at least" in capsys.readouterr().err


def test_compilation_cache_directory_and_switches(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compilation_cache.enable({"TMPQ_COMPILATION_CACHE": "0"}) is None
        assert jax.config.jax_compilation_cache_dir is None
        got = compilation_cache.enable({"XDG_CACHE_HOME": str(tmp_path)})
        assert got == tmp_path / "tmpq_jax" / "jax"
        assert jax.config.jax_compilation_cache_dir == str(got)
        # a directory already chosen (e.g. $JAX_COMPILATION_CACHE_DIR) is kept
        assert compilation_cache.enable({"TMPQ_COMPILATION_CACHE": "/x"}) is None
        assert jax.config.jax_compilation_cache_dir == str(got)
        jax.config.update("jax_compilation_cache_dir", None)
        got = compilation_cache.enable({"TMPQ_COMPILATION_CACHE": str(tmp_path / "c")})
        assert got == tmp_path / "c"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_search_help_lists_the_config_keys(capsys):
    from tmpq_jax.search import SearchConfig

    with pytest.raises(SystemExit) as e:
        main(["search", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in SearchConfig().to_dict():
        assert f"--config.search.{key}=" in out, key
    assert "--config.search.population=50\n" in out
    assert "--config.search.candidates=(8,7,6,5)" in out
    assert "--config.calibration=None" in out and "--rescore" in out


def test_rerunning_a_finished_search_only_prints_it(tmp_path, capsys, monkeypatch):
    asked = []

    def search(run, workdir, progress=True, rescore=False, model=None):
        asked.append(rescore)
        return {
            "rescored": {"fid": 1.0, "num_samples": 512},
            "fid_search": 1.5,
            "search_samples": 256,
            "total_bitops": 1e9,
            "budget_bitops": 2e9,
            "timesteps": [0, 500],
            **({} if rescore else {"reused": True}),
        }

    monkeypatch.setattr("tmpq_jax.search.search", search)
    args = ["search", "--config", CPU, "--workdir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert "nothing run" in out and str(tmp_path / "result.json") in out
    assert "--rescore" in out
    assert main([*args, "--rescore"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("wrote ")
    assert asked == [False, True]
