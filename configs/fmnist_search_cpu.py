"""The reduced search `tmpq search` runs by default on a CPU: population 8,
3 generations, 256 samples per candidate; the best 2 re-scored on 512 samples.
Everything else is the paper protocol (the defaults, tmpq_jax/search/config.py).
Samples go through the model 64 at a time: on 2 CPU cores that is faster than 256
at once (a smaller working set).

  tmpq search        # on a CPU; writes runs/search
"""

from tmpq_jax.search.config import default_configdict


def get_config(arg=None):
    c = default_configdict()
    c.search.update(
        population=8,
        generations=3,
        num_samples=256,
        sample_chunk=64,
        rescore_top_k=2,
        rescore_samples=512,
        rescore_batch=256,
    )
    return c
