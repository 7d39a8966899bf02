"""The injection point: every conv, dense and attention matmul of the UNet.

The model uses only these three classes for anything that multiplies. They are
plain Flax linen modules, so the quantization supernet can take them over from
outside with `nn.intercept_methods` (matching on the module type and path),
without touching the model code; the same works for any linen model built on
`nn.Conv` / `nn.Dense`, since `Conv` and `Dense` are those classes.
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
