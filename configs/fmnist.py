"""The shipped Fashion-MNIST model: a 2.7M-parameter UNet, 28x28, eps-prediction.

Train (H100, resumable: rerun the same command after an interruption):
  tmpq train --config configs/fmnist.py --workdir runs/fmnist
Then ship `runs/fmnist/model` as `checkpoints/fmnist_unet` (see README).
The card beside the shipped params records steps, wall time and device.
"""

from tmpq_jax.config import default_configdict


def get_config(arg=None):
    c = default_configdict()  # the model is UNetConfig's default architecture
    c.train.update(
        num_steps=40_000,
        batch_size=256,
        learning_rate=4e-4,
        warmup_steps=1000,
        steps_per_call=200,
        ckpt_every=5000,
    )
    return c
