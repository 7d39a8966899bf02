"""The CPU default (configs/fmnist_search_cpu.py, what `tmpq search` runs on a CPU):
its fitness ranks on fewer samples than FID could, and its re-scoring still reports
every evaluation space; an FID on too few samples is refused in one line."""

from pathlib import Path

import numpy as np

from tmpq_jax.cli import main
from tmpq_jax.config import load_config
from tmpq_jax.evaluation import SHIPPED_EVAL_NETS
from tmpq_jax.metrics import REF_STATS_FILE, load_feature_net
from tmpq_jax.search import SearchRunConfig

CPU = "configs/fmnist_search_cpu.py"


def test_the_cpu_default_reports_every_evaluation_space():
    cfg = SearchRunConfig.from_configdict(load_config(CPU)).search
    net = load_feature_net(None)  # the fitness net
    dims = [load_feature_net(p).feature_dim for p in (net.path, *SHIPPED_EVAL_NETS)]
    with np.load(Path(net.path) / REF_STATS_FILE) as stats:
        dims.append(stats["mu_pixels_test"].shape[0])  # fid_pixels needs more
    assert cfg.fitness == "teacher" and cfg.num_samples <= min(dims)
    assert cfg.rescore_samples > max(dims) and cfg.select != "teacher"


def test_fid_on_too_few_samples_is_refused_in_one_line(tmp_path, capsys):
    wd = tmp_path / "wd"
    args = ["search", "--config", CPU, "--workdir", str(wd)]
    for flags, name in (
        (["fitness=fid", "num_samples=100"], "num_samples=100"),
        (["rescore_samples=100"], "rescore_samples=100"),  # select=fid
    ):
        assert main([*args, *(f"--config.search.{f}" for f in flags)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{name}: FID needs more samples than the 128" in err
        assert "\n" not in err and not wd.exists()
