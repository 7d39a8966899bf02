"""The reduced search `tmpq search` runs by default on a CPU: population 8,
3 generations, 256 samples per candidate; the best 2 re-scored on 512 samples.
Everything else is the paper protocol of configs/fmnist_search.py. Samples go
through the model 64 at a time: on 2 CPU cores that is faster than 256 at once
(a smaller working set).

  tmpq search        # on a CPU; writes runs/search
"""

from pathlib import Path

from tmpq_jax.config import load_config


def get_config(arg=None):
    c = load_config(str(Path(__file__).with_name("fmnist_search.py")))
    c.search.update(
        population=8,
        generations=3,
        num_samples=256,
        candidate_chunk=1,
        sample_chunk=64,
        rescore_top_k=2,
        rescore_samples=512,
        rescore_batch=256,
    )
    return c
