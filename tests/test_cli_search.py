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
        ("--config.search.num_samples=100", "more samples than the 128"),
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
