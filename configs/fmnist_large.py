"""A larger candidate for the shipped model: 4.0M parameters, 2 res blocks a level,
attention at 14x14 and 7x7, 80k steps (~22 min on an H100 at ~61 steps/s).

  tmpq train --config configs/fmnist_large.py --workdir runs/fmnist_large

Trained to 56k of 80k steps so far (the GPU budget of the session that started it
ran out); if its FID beats configs/fmnist.py's, it becomes the shipped model.
"""

from pathlib import Path

from tmpq_jax.config import load_config


def get_config(arg=None):
    c = load_config(str(Path(__file__).with_name("fmnist.py")))
    c.model.update(num_res_blocks=2, attn_resolutions=(14, 7))
    c.train.update(num_steps=80_000)
    return c
