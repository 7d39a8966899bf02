"""TMPQ-DM's search protocol (arXiv 2404.09532) on the shipped Fashion-MNIST model.

Population 50, 20 generations (top 10 kept, 25 mutations with p = 0.25, 10
crossovers, random refill), 2000 samples per candidate from one fixed noise batch,
N = 10 steps, one per quadratic group, bits {8, 7, 6, 5} per layer for weights and
activations, budget = total BitOPs of uniform W6A6 at 10 steps (repair operator).
The top 10 are re-scored on 10k fresh samples.

That protocol is the default of every setting (tmpq_jax/search/config.py, the one
place defaults live), so this file overrides nothing; any setting can be
overridden on the command line by its name:

  tmpq search --config configs/fmnist_search.py --workdir runs/search
  # baselines: --config.search.space=precision | timesteps, --config.search.strategy=random
  # harder budget: --config.search.candidates='(8,7,6,5,4)' --config.search.budget_w_bits=4
  # the fitness (default teacher): --config.search.fitness=fid | ensemble
"""

from tmpq_jax.search.config import default_configdict


def get_config(arg=None):
    return default_configdict()
