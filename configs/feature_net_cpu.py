"""A feature net small enough to train on a CPU: a 3-stage `resnet` (stride-2 stem)
of widths 16-32-32 with 32 feature dims, 600 steps of batch 128 (about 1.3 s a step
at 28x28 on a 2-core machine shared with other jobs: ~13 minutes; 16x16 is faster). With labels it is a classifier, without them a
SimCLR net (see tmpq_jax/metrics/train_classifier.py).

  tmpq train-classifier --config configs/feature_net_cpu.py --data FILE.npz --workdir DIR
"""

from tmpq_jax.metrics.train_classifier import default_configdict


def get_config(arg=None):
    c = default_configdict()
    c.model.update(widths=(16, 32, 32), feature_dim=32, arch="resnet")
    c.update(batch_size=128, num_steps=600, steps_per_call=50, warmup_steps=50)
    c.learning_rate = 3e-3
    return c
