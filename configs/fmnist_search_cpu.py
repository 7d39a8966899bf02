"""The reduced search `tmpq search` runs by default on a CPU: population 8,
3 generations, each genome scored by the `teacher` fitness on 32 samples (its
distance to the full-precision model's 20-step samples from the same noise: per
sample, so it ranks on few samples, where FID needs more than its 128 feature dims);
the best genome re-scored on 256 fresh samples (more than the 196 pooled-pixel
dims, so every evaluation space is reported) and its selection score is the
train-split FID (the teacher's would sample the teacher again on those 256).
Everything else is the paper protocol (tmpq_jax/search/config.py). Samples go
through the model 64 at a time: on 2 CPU cores that is faster than 256 at once.
Time and scores against the seed genome: benchmarks/results/cpu.json.

  tmpq search        # on a CPU; writes runs/search
"""

from tmpq_jax.search.config import default_configdict


def get_config(arg=None):
    c = default_configdict()
    c.search.update(
        population=8,
        generations=3,
        num_samples=32,
        teacher_steps=20,
        sample_chunk=64,
        rescore_top_k=1,
        rescore_samples=256,
        rescore_batch=256,
        select="fid",
    )
    return c
