"""Configs: Python files returning a ConfigDict, turned once into frozen dataclasses.

`load_config("configs/fmnist.py", ["train.num_steps=100"])` runs the file's
`get_config()` (a `path.py:arg` suffix is passed as its argument), applies the
`--config.key=value` overrides with type checks, and returns the ConfigDict.
`ExperimentConfig.from_configdict` is the typed boundary: nothing past it sees a
ConfigDict.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from tmpq_jax.diffusion.schedules import DiffusionConfig
from tmpq_jax.errors import UserError, check_keys
from tmpq_jax.models.unet import UNetConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "fmnist"  # 'fmnist' or a path to an .npz of uint8 images
    data_dir: str | None = None  # idx directory; None: where the apt package puts it


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    steps_per_call: int = 50  # train steps per host call (a lax.scan; on CPU a loop)
    ckpt_every: int = 1000
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: UNetConfig
    diffusion: DiffusionConfig
    data: DataConfig
    train: TrainConfig

    @classmethod
    def from_configdict(cls, cd: ml_collections.ConfigDict) -> ExperimentConfig:
        d = cd.to_dict()
        return cls(
            model=UNetConfig.from_dict(d.get("model", {})),
            diffusion=_build(DiffusionConfig, d.get("diffusion", {}), "diffusion"),
            data=_build(DataConfig, d.get("data", {}), "data"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _build(cls, d: dict, section: str):
    check_keys(cls, d, f"config.{section}")
    return cls(**d)


def _run_config_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"config file {path} not found; see configs/ for the shipped ones (they "
            "are read from the repository: install with `pip install -e .` in a clone)."
        )
    module_spec = importlib.util.spec_from_file_location(f"_tmpq_config_{p.stem}", p)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} defines no get_config().")
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def apply_override(cd: ml_collections.ConfigDict, assignment: str) -> None:
    """Applies 'a.b.c=value' to `cd` in place; unknown keys and bad types raise."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise UserError(f"override {assignment!r}: write --config.KEY=VALUE.")
    node, parts = cd, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "config"
            known = (
                sorted(node.keys())
                if isinstance(node, ml_collections.ConfigDict)
                else []
            )
            raise UserError(
                f"unknown config key {key!r} (no {part!r} in {where}; known: {known})."
            )
        if i < len(parts) - 1:
            node = node[part]
    value = _parse_value(text)
    old = node[parts[-1]]
    if isinstance(old, tuple | list) and isinstance(value, int | float):
        value = (value,)
    try:
        node[parts[-1]] = tuple(value) if isinstance(old, tuple) else value
    except (TypeError, ValueError) as e:
        raise UserError(f"--config.{key}={text}: {e}") from None


def configdict_of(config: Any) -> ml_collections.ConfigDict:
    """A config dataclass as the ConfigDict a config file starts from: every
    setting at its default (overridable by name, restated nowhere)."""
    cd = ml_collections.ConfigDict(dataclasses.asdict(config))
    cd.data.data_dir = config_dict.placeholder(str)
    return cd


def default_configdict() -> ml_collections.ConfigDict:
    """The UNet's training settings at their defaults (`configs/fmnist.py` starts here)."""
    return configdict_of(
        ExperimentConfig(UNetConfig(), DiffusionConfig(), DataConfig(), TrainConfig())
    )


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    cd = _run_config_file(spec)
    for assignment in overrides:
        apply_override(cd, assignment)
    return cd
