"""The shipped class-conditional DiT for Fashion-MNIST, trained by flow matching.

DiT with patch 2 (196 tokens), width 192, depth 6, 6 heads: 4.16M parameters,
1.24 GFLOP per image per forward (XLA cost analysis). Velocity prediction
(x_t = (1 - t) x0 + t noise, v = noise - x0), logit-normal t, labels dropped to
the null class 10% of the time so that classifier-free guidance works.

Read by `tmpq_jax.train.loop.experiment_config` (a `flow` section makes it a
flow config; `tmpq train` reads it once its cmd_train calls that instead of
`ExperimentConfig.from_configdict`). Train in resumable chunks: rerun the same
command until it reports the last step; `timeout -s INT` stops a chunk cleanly
(the loop's finally closes the checkpoints; the next run resumes from the last
one, at most ckpt_every steps back, and the result equals an unbroken run):
  timeout -s INT 500 tmpq train --config configs/fmnist_dit.py --workdir runs/fmnist_dit
"""

from tmpq_jax.train.loop import flow_default_configdict


def get_config(arg=None):
    c = flow_default_configdict()  # DiTConfig's and FlowConfig's defaults
    c.train.update(
        num_steps=24_000,
        batch_size=256,
        learning_rate=3e-4,
        warmup_steps=1000,
        steps_per_call=200,
    )
    return c
