"""An NNX module behind the Linen-style `apply` the rest of the library calls.

The supernet, calibration, export and the search are functional: they call
`model.apply({'params': params}, *inputs)` under jit and vmap, with params as a
pytree. `NNXModel` gives an `nnx.Module` that face: `params` is its `nnx.Param`
state as a pure dict, and `apply` merges a (possibly traced) copy of them back
into the module's graph and calls it. Other state (batch statistics, RNG
counters) is taken as it was when wrapped. While the merged module runs, its
submodules are named by attribute path (`blocks/0/attn`), so the op-level
interceptor names their ops as it names Linen ones.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from tmpq_jax.errors import UserError
from tmpq_jax.quant import intercept


class NNXModel:
    """`apply(variables, *args, **kwargs)` for an `nnx.Module` (a snapshot of it)."""

    def __init__(self, module: nnx.Module, method: str = "__call__"):
        if not isinstance(module, nnx.Module):
            raise UserError(
                f"NNXModel wraps an nnx.Module, got {type(module).__name__}."
            )
        self.module_type = type(module)
        self.method = method
        self.graphdef, params, self.rest = nnx.split(module, nnx.Param, ...)
        self.params = nnx.to_pure_dict(params)
        self._abstract = nnx.eval_shape(lambda: params)

    @property
    def __name__(self) -> str:  # for messages that name the model's type
        return self.module_type.__name__

    def merge(self, params: Any) -> nnx.Module:
        """The module with `params` (a pure dict like `self.params`) as its Params."""
        state = nnx.clone(self._abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.rest)

    def apply(self, variables: dict, *args, **kwargs):
        module = self.merge(variables["params"])
        with intercept.nnx_paths(module):
            return getattr(module, self.method)(*args, **kwargs)
