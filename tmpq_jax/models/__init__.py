"""The diffusion UNet and the layer classes through which all its matmuls run;
the class-conditional DiT (flow matching)."""

from tmpq_jax.models.dit import DiT, DiTConfig
from tmpq_jax.models.ops import Conv, Dense, MatMul
from tmpq_jax.models.unet import UNet, UNetConfig, count_params

__all__ = [
    "Conv",
    "Dense",
    "DiT",
    "DiTConfig",
    "MatMul",
    "UNet",
    "UNetConfig",
    "count_params",
]
