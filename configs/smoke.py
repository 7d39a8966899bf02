"""A tiny variant of configs/fmnist.py for tests and a CPU smoke run (seconds).

tmpq train --config configs/smoke.py --workdir /tmp/smoke
"""

from pathlib import Path

from tmpq_jax.config import load_config


def get_config(arg=None):
    c = load_config(str(Path(__file__).with_name("fmnist.py")))
    c.model.update(ch=8, ch_mult=(1, 2), attn_resolutions=(14,), num_groups=4)
    c.train.update(
        num_steps=20, batch_size=8, warmup_steps=5, steps_per_call=5, ckpt_every=10
    )
    return c
