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

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = dict(
        image_size=28,
        channels=1,
        patch=2,
        width=192,
        depth=6,
        heads=6,
        num_classes=10,
        mlp_ratio=4.0,
        time_embed_dim=256,
        time_scale=1000.0,
        prediction="velocity",
        dtype="float32",
    )
    c.flow = dict(
        t_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, label_dropout=0.1
    )
    c.data = ml_collections.ConfigDict(
        dict(name="fmnist", data_dir=config_dict.placeholder(str))
    )
    c.train = dict(
        num_steps=24_000,
        batch_size=256,
        learning_rate=3e-4,
        warmup_steps=1000,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.9995,
        steps_per_call=200,
        ckpt_every=1000,  # a chunk stopped by timeout loses at most this many steps
        seed=0,
    )
    return c
