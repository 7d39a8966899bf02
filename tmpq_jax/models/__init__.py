"""The diffusion UNet and the layer classes through which all its matmuls run."""

from tmpq_jax.models.ops import Conv, Dense, MatMul
from tmpq_jax.models.unet import UNet, UNetConfig, count_params

__all__ = ["Conv", "Dense", "MatMul", "UNet", "UNetConfig", "count_params"]
