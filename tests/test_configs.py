"""Config files hold overrides only: the dataclasses are the one source of defaults."""

from pathlib import Path

import ml_collections
import numpy as np
import pytest

from tmpq_jax.config import ExperimentConfig, load_config
from tmpq_jax.train.loop import experiment_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_config_file_restates_a_default(path, monkeypatch):
    """Every `.update(key=value)` a config file makes changes the value it
    starts from (the dataclass defaults, or the file it builds on)."""
    restated = []
    update = ml_collections.ConfigDict.update

    def checked(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            old = self[key] if key in self else object()
            same = (
                tuple(old) == tuple(value)
                if isinstance(old, tuple | list)
                else old == value
            )
            if same:
                restated.append(f"{key}={value!r}")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(ml_collections.ConfigDict, "update", checked)
    load_config(str(path))
    assert not restated, f"{path.name} restates defaults: {restated}"


def test_overrides_reach_settings_a_file_does_not_name():
    cd = load_config(
        "configs/fmnist.py", ["model.num_heads=2", "diffusion.beta_end=0.03"]
    )
    cfg = ExperimentConfig.from_configdict(cd)
    assert cfg.model.num_heads == 2 and cfg.diffusion.beta_end == 0.03
    dit = experiment_config(
        load_config("configs/fmnist_dit.py", ["flow.logit_std=0.5"])
    )
    assert dit.flow.logit_std == 0.5 and dit.model.width == 192


def test_the_default_teacher_schedule_is_valid_for_the_shipped_model():
    # Found on the GPU: 100 quad steps of 1000 repeat timesteps and were refused.
    from tmpq_jax.diffusion.schedules import timestep_schedule
    from tmpq_jax.search.config import SearchConfig

    c = SearchConfig(fitness="teacher")
    ts = np.asarray(timestep_schedule(c.teacher_schedule, c.teacher_steps, 1000))
    assert len(ts) == c.teacher_steps and np.all(np.diff(ts) > 0)


@pytest.mark.parametrize(
    ("fitness", "weight", "label"),
    [("teacher", 0.0, "teacher_pixels"), ("teacher", 1.0, "teacher"),
     ("teacher", 0.5, "teacher_w0.5"), ("fid", 0.0, "fid"), ("ensemble", 2.0, "ensemble")],
)  # fmt: skip
def test_result_rows_name_the_teacher_by_its_feature_weight(fitness, weight, label):
    """A pixels-only teacher's rows must not merge with, or pass for, the teacher
    with features (the search table keys rows by this label)."""
    from tmpq_jax.search.config import SearchConfig, fitness_label

    cfg = SearchConfig(fitness=fitness, teacher_feature_weight=weight)
    assert fitness_label(cfg) == label
    assert fitness_label(SearchConfig()) == "teacher_pixels"  # the default
