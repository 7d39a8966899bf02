"""TMPQ-DM's search protocol (arXiv 2404.09532) on the shipped Fashion-MNIST model.

Population 50, 20 generations (top 10 kept, 25 mutations with p = 0.25, 10
crossovers, random refill), 2000 samples per candidate from one fixed noise batch,
N = 10 steps, one per quadratic group, bits {8, 7, 6, 5} per layer for weights and
activations, budget = total BitOPs of uniform W6A6 at 10 steps (repair operator).
The top 10 are re-scored on 10k fresh samples.

  tmpq search --config configs/fmnist_search.py --workdir runs/search
  # baselines: --config.search.space=precision | timesteps, --config.search.strategy=random
  # harder budget: --config.search.candidates='(8,7,6,5,4)' --config.search.budget_w_bits=4
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = config_dict.placeholder(str)  # None: checkpoints/fmnist_unet
    c.calibration = config_dict.placeholder(str)  # None: shipped, else calibrate
    c.feature_net = config_dict.placeholder(str)  # None: the shipped classifier
    c.calib_timesteps = 20
    c.calib_samples = 32
    c.search = dict(
        space="joint",
        timestep_mode="grouped",
        num_steps=10,
        min_steps=2,
        candidates=(8, 7, 6, 5),
        seed_w_bits=6,
        seed_a_bits=6,
        budget_w_bits=6,
        budget_a_bits=6,
        budget_steps=10,
        constraint="repair",
        penalty_weight=1000.0,
        strategy="tmpq_ga",
        population=50,
        generations=20,
        elite_frac=0.2,
        mutant_frac=0.5,
        crossover_frac=0.2,
        mutation_prob=0.25,
        init_mutant_frac=0.48,
        es_std=0.15,
        num_samples=2000,
        candidate_chunk=1,
        sample_chunk=0,
        pop_shards=0,
        seed=0,
        rescore_top_k=10,
        rescore_samples=10_000,
        rescore_batch=2000,
    )
    return c
