"""Search the shipped class-conditional DiT (flow matching, checkpoints/fmnist_dit).

The paper protocol (tmpq_jax/search/config.py) at the W6A6 budget, N = 10 time
groups of the SD3 grid (shift 1: uniform), Euler, classifier-free guidance at
scale 1.5 (the best full-precision FID at 10 steps, benchmarks/results/dit_fp.json),
which doubles each step's forwards and so its BitOPs. The fitness samples
class-balanced labels. `:cpu` is the reduced run for a CPU (as
configs/fmnist_search_cpu.py):

  tmpq search --config configs/fmnist_dit_search.py --workdir runs/dit_search
  tmpq search --config configs/fmnist_dit_search.py:cpu --workdir runs/dit_search
"""

from pathlib import Path

from tmpq_jax.config import load_config
from tmpq_jax.search.config import default_configdict


def get_config(arg=None):
    if arg == "cpu":
        c = load_config(str(Path(__file__).with_name("fmnist_search_cpu.py")))
    elif arg is None:
        c = default_configdict()
    else:
        raise ValueError(f"unknown variant {arg!r}: use none or 'cpu'")
    c.model = "checkpoints/fmnist_dit"
    c.search.guidance = 1.5
    return c
