"""The shipped evaluation nets and the second fitness net (checkpoints/), each a
variant of configs/feature_net_cpu.py trained on this CPU:

  # evaluation only (never given to a fitness): a supervised resnet ...
  tmpq train-classifier --config configs/eval_nets.py:eval_resnet --workdir checkpoints/fmnist_eval_resnet
  # ... and a label-free one (SimCLR)
  tmpq train-classifier --config configs/eval_nets.py:eval_simclr --workdir checkpoints/fmnist_eval_simclr
  # the ensemble fitness's second net (a small cnn like the fitness net's)
  tmpq train-classifier --config configs/eval_nets.py:fitness_b --workdir checkpoints/fmnist_classifier_b
"""

from pathlib import Path

from tmpq_jax.config import load_config


def get_config(arg="eval_resnet"):
    c = load_config(str(Path(__file__).with_name("feature_net_cpu.py")))
    if arg == "eval_resnet":
        c.update(objective="labels", seed=1, num_steps=500)
    elif arg == "eval_simclr":
        c.update(objective="contrastive", seed=2, num_steps=250)
    elif arg == "fitness_b":
        c.model.update(arch="cnn", widths=(8, 16, 32), feature_dim=32)
        c.update(objective="labels", seed=3, num_steps=300)
    else:
        raise ValueError(
            f"unknown variant {arg!r}: eval_resnet, eval_simclr, fitness_b"
        )
    return c
