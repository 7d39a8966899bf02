"""One abstract trace of a model that describes each of its matmuls and convs.

`build_registry`'s half that reads the computation (`registry.py` turns the result
into layers). Two facts are read from the values themselves, not from names:

* which operand is a weight: the trace runs under `jax.vmap` over the model's
  inputs, so an operand that depends on them is batched and one that does not
  (a param, or anything computed from params alone) is not;
* which operand is a softmax output: a few primitives are watched while the model
  runs and tag their outputs (exp, a sum of that exp, their quotient, and what
  only casts, reshapes, broadcasts, transposes or masks it).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.interpreters.batching import BatchTracer  # vmap's tracer type

from tmpq_jax.quant import intercept

_TRANSPARENT = (
    "convert_element_type",
    "reshape",
    "broadcast_in_dim",
    "transpose",
    "squeeze",
    "copy",
    "copy_p",
    "reduce_precision",
)
WATCHED = {
    name: getattr(lax, f"{name}_p")
    for name in ("exp", "reduce_sum", "div", "select_n", *_TRANSPARENT)
    if hasattr(lax, f"{name}_p")
}


class _Tags:
    """Provenance tags by tracer identity (tracers kept alive: ids stay unique)."""

    def __init__(self):
        self.tags: dict[int, tuple] = {}
        self.keep: list = []

    def get(self, x) -> tuple | None:
        return self.tags.get(id(x))

    def set(self, x, tag) -> None:
        self.tags[id(x)] = tag
        self.keep.append(x)

    def __call__(self, name, args, params, out) -> None:
        del params
        if name == "exp":
            self.set(out, ("exp", id(out)))
        elif name == "reduce_sum":
            t = self.get(args[0])
            if t and t[0] == "exp":
                self.set(out, ("sum", t[1]))
        elif name == "div":
            a, b = self.get(args[0]), self.get(args[1])
            if a and b and a[0] == "exp" and b[0] == "sum" and a[1] == b[1]:
                self.set(out, ("softmax",))
        elif name == "select_n":
            if any(self.get(c) == ("softmax",) for c in args[1:]):
                self.set(out, ("softmax",))
        elif self.get(args[0]) is not None:
            self.set(out, self.get(args[0]))

    def is_softmax(self, x) -> bool:
        return self.get(x) == ("softmax",)


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _conv_layout_reason(call: intercept.OpCall) -> str | None:
    dn, rank = call.params["dimension_numbers"], jnp.ndim(call.lhs)
    if (
        tuple(dn.lhs_spec[:2]) != (0, rank - 1)
        or tuple(dn.rhs_spec[:2]) != (rank - 1, rank - 2)
        or tuple(dn.out_spec[:2]) != (0, rank - 1)
    ):
        return "convolution layout is not channels-last (AQT takes NHWC / HWIO)"
    if call.params.get("batch_group_count", 1) != 1:
        return "convolution with batch_group_count > 1"
    return None


def _macs_and_channels(call, out_shape, weight: int | None) -> tuple[float, int]:
    out_size = math.prod(out_shape)
    lshape, rshape = jnp.shape(call.lhs), jnp.shape(call.rhs)
    if call.prim == "conv":
        o = call.params["dimension_numbers"].rhs_spec[0]
        return out_size * math.prod(rshape) / rshape[o], rshape[o]
    (lc, rc), _ = call.params["dimension_numbers"]
    macs = out_size * math.prod(lshape[i] for i in lc)
    if weight is None:
        return macs, 0
    shape, contracted = (lshape, lc) if weight == 0 else (rshape, rc)
    return macs, math.prod(d for i, d in enumerate(shape) if i not in contracted)


def _describe(call, out, depends, tags: _Tags, param_paths: dict) -> dict:
    dl, dr = depends(call.lhs), depends(call.rhs)
    weight = None if dl == dr else (1 if dl else 0)
    reason = None
    if not (_floating(call.lhs) and _floating(call.rhs)):
        reason = "integer operands (exact already)"
    elif not (dl or dr):
        reason = "no operand depends on the model's inputs"
    elif (
        call.prim == "dot_general"
        and weight is not None
        and any(call.params["dimension_numbers"][1])
    ):
        reason = "weight with batch dimensions (per-channel scales need none)"
    elif call.prim == "conv":
        reason = _conv_layout_reason(call)
        if reason is None and weight != 1:
            reason = "convolution whose kernel is an activation"
    kind = "matmul" if weight is None else ("conv" if call.prim == "conv" else "dense")
    swap = (
        weight is None and tags.is_softmax(call.rhs) and not tags.is_softmax(call.lhs)
    )
    operands = (call.lhs, call.rhs)
    if weight == 0 or swap:
        operands = operands[::-1]
    macs, channels = _macs_and_channels(call, jnp.shape(out), weight)
    w = None if weight is None else (call.lhs, call.rhs)[weight]
    if w is None:
        contracting = ()
    elif call.prim == "conv":
        o = call.params["dimension_numbers"].rhs_spec[0]
        contracting = tuple(i for i in range(jnp.ndim(w)) if i != o)
    else:
        contracting = tuple(call.params["dimension_numbers"][0][weight])
    return dict(
        weight_contracting=contracting,
        site=call.site,
        kind=kind,
        reason=reason,
        in_shapes=tuple(tuple(jnp.shape(a)) for a in operands),
        out_shape=tuple(jnp.shape(out)),
        kernel_shape=None if w is None else tuple(jnp.shape(w)),
        macs=float(macs),
        weight_operand=weight,
        swap=bool(swap),
        channels=int(channels),
        softmax_left=weight is None and tags.is_softmax(operands[0]),
        param_path=None if w is None else param_paths.get(id(w)),
    )


def _key(k) -> str | int:
    """A pytree path entry as the dict key it is (NNX lists have int keys)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            v = getattr(k, attr)
            return v if isinstance(v, int) else str(v)
    return str(k)


def trace_ops(model, variables: Any, args: tuple, apply_kwargs: dict) -> list[dict]:
    """Every matmul/conv of `model.apply(variables, *args)` in call order (with
    repeats), described for the registry (abstract: nothing is computed)."""
    ops: list[dict] = []

    def fn(v, *a):
        leaves = jax.tree_util.tree_leaves_with_path(v)
        param_paths = {id(x): tuple(map(_key, p))[1:] for p, x in leaves}

        def one(*xs):
            trace = jax.tree.leaves(xs)[0]._trace if xs else None

            def depends(x) -> bool:
                while isinstance(x, BatchTracer):
                    if x._trace is trace and x.batch_dim is not None:  # None: unmapped
                        return True
                    x = x.val
                return False

            tags = _Tags()

            def record(call):
                out = call.original()
                ops.append(_describe(call, out, depends, tags, param_paths))
                return out

            with intercept.watch(WATCHED, tags), intercept.intercept(record):
                return model.apply(v, *xs, **apply_kwargs)

        return jax.vmap(one)(*jax.tree.map(lambda x: x[None], a))

    jax.eval_shape(fn, variables, *args)
    return ops
