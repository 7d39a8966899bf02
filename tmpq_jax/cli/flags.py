"""What several commands share: the default config and the `--model` flag."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "fmnist.py")


def add_model_flag(p) -> None:
    p.add_argument(
        "--model",
        metavar="FILE.py:FACTORY",
        help="your own model: a factory returning (module, params, {'image_size': "
        "H, 'channels': C}); Linen or NNX (see tmpq_jax/user_model.py)",
    )
