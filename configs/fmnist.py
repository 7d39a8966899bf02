"""The shipped Fashion-MNIST model: a 2.7M-parameter UNet, 28x28, eps-prediction.

Train (H100, resumable: rerun the same command after an interruption):
  tmpq train --config configs/fmnist.py --workdir runs/fmnist
Then ship `runs/fmnist/model` as `checkpoints/fmnist_unet` (see README).
The card beside the shipped params records steps, wall time and device.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = dict(
        image_size=28,
        channels=1,
        ch=32,
        ch_mult=(1, 2, 4),
        num_res_blocks=1,
        attn_resolutions=(7,),
        num_heads=1,
        num_groups=8,
        dtype="float32",
    )
    c.diffusion = dict(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    c.data = ml_collections.ConfigDict(
        dict(name="fmnist", data_dir=config_dict.placeholder(str))
    )
    c.train = dict(
        num_steps=40_000,
        batch_size=256,
        learning_rate=4e-4,
        warmup_steps=1000,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.9995,
        steps_per_call=200,
        ckpt_every=5000,
        seed=0,
    )
    return c
