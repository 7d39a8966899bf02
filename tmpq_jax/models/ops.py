"""The UNet's multiplying layers under stable names.

The quantizer intercepts every matmul and convolution whatever calls it
(`tmpq_jax/quant/intercept.py`), so nothing here is needed for quantization any
more. The UNet keeps `MatMul` so that its attention ops keep the names its
genomes and calibrations use (`.../attn/qk`, `.../attn/av`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Conv = nn.Conv
Dense = nn.Dense


class MatMul(nn.Module):
    """A parameter-free einsum between two activations (attention q.k and a.v).

    A module rather than a bare `jnp.einsum` call only so that interceptors see it
    (with a stable path such as `.../attn/qk`) and can quantize both operands.
    """

    equation: str
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if self.dtype is not None:
            a, b = a.astype(self.dtype), b.astype(self.dtype)
        return jnp.einsum(self.equation, a, b)
