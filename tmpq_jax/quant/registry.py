"""The ordered list of a model's quantizable layers, computed from shapes.

TMPQ-DM (arXiv 2404.09532) gives every conv and linear layer a weight gene and an
activation gene, and every attention matmul activation genes; its cost model needs
each layer's MACs and parameter count. `build_registry` traces the model once with
`jax.eval_shape` and a Flax method interceptor that records every `nn.Conv`,
`nn.Dense` (and subclasses) and `tmpq_jax.models.ops.MatMul` call: its module path,
kind, shapes, MACs per sample and kernel size. Nothing is written by hand, so the
registry follows the architecture. Layer order is first-call order in the forward
pass; names are the '/'-joined module paths (`down_0_res_0/conv0`, `mid_attn/qk`).

The `av` matmul's left operand is a softmax output, which TMPQ-DM keeps at a fixed
8 bits: such operands are recorded as `pinned_lhs_bits`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError
from tmpq_jax.models.ops import MatMul

SOFTMAX_MATMULS = ("av",)  # MatMul names whose left operand is a softmax output
SOFTMAX_BITS = 8
KINDS = ("conv", "dense", "matmul")
HOW_TO_LIST = "print(tmpq_jax.quant.format_registry(registry)) lists the layer names"


def layer_kind(module: nn.Module) -> str | None:
    """'conv', 'dense', 'matmul' for the layers the supernet quantizes, else None."""
    if isinstance(module, nn.Conv):
        return "conv"
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, MatMul):
        return "matmul"
    return None


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer. Shapes are at the batch the registry was built with."""

    name: str
    path: tuple[str, ...]
    kind: str
    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...] | None
    macs: float  # per sample, summed over calls
    params: int  # kernel elements (the quantized weights; biases stay float)
    pinned_lhs_bits: int | None  # fixed left-operand bits (softmax output of `av`)
    calls: int = 1


@dataclasses.dataclass(frozen=True)
class LayerRegistry:
    """Quantizable layers in forward order; layer i owns genes w_bits[i], a_bits[i]."""

    layers: tuple[LayerInfo, ...]
    _by_path: dict = dataclasses.field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self):
        object.__setattr__(
            self, "_by_path", {layer.path: i for i, layer in enumerate(self)}
        )

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i: int) -> LayerInfo:
        return self.layers[i]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def index(self, name: str) -> int:
        """Index of the layer called `name` ('/'-joined path); UserError if unknown."""
        i = self._by_path.get(tuple(name.split("/")) if name else ())
        if i is None:
            raise UserError(f"unknown layer name {name!r}; {HOW_TO_LIST}.")
        return i

    def index_of_path(self, path: Sequence[str]) -> int:
        i = self._by_path.get(tuple(path))
        if i is None:
            raise UserError(
                f"layer {'/'.join(path)!r} of the model is not in the layer registry "
                f"(built for another model?); rebuild it with build_registry; {HOW_TO_LIST}."
            )
        return i

    # Per-layer arrays for the cost model (numpy: static, no device transfer).
    @property
    def macs(self) -> np.ndarray:
        return np.array([layer.macs for layer in self.layers], np.float64)

    @property
    def params(self) -> np.ndarray:
        return np.array([layer.params for layer in self.layers], np.int64)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(layer.kind for layer in self.layers)

    @property
    def pinned_lhs_bits(self) -> np.ndarray:
        """int32[L]: the fixed left-operand width, 0 where the genome's a_bits rule."""
        return np.array([layer.pinned_lhs_bits or 0 for layer in self.layers], np.int32)


def _einsum_macs(equation: str, a_shape, b_shape, out_size: int) -> int:
    ins, out = equation.replace(" ", "").split("->")
    in_a, in_b = ins.split(",")
    if "." in equation:
        raise NotImplementedError(f"MatMul equation {equation!r}: no ellipsis support")
    sizes = dict(zip(in_a, a_shape, strict=True)) | dict(
        zip(in_b, b_shape, strict=True)
    )
    contracted = (set(in_a) | set(in_b)) - set(out)
    return out_size * math.prod(sizes[c] for c in contracted)


def _record(module, kind, args, out, softmax_matmuls) -> LayerInfo:
    in_shapes = tuple(tuple(a.shape) for a in args if hasattr(a, "shape"))
    out_size = math.prod(out.shape)
    kernel_shape, pinned = None, None
    if kind == "matmul":
        macs = _einsum_macs(module.equation, in_shapes[0], in_shapes[1], out_size)
        if module.path and module.path[-1] in softmax_matmuls:
            pinned = SOFTMAX_BITS
    else:
        kernel_shape = tuple(module.variables["params"]["kernel"].shape)
        contracted = kernel_shape[:1] if kind == "dense" else kernel_shape[:-1]
        macs = out_size * math.prod(contracted)
    return LayerInfo(
        name="/".join(module.path),
        path=tuple(module.path),
        kind=kind,
        in_shapes=in_shapes,
        out_shape=tuple(out.shape),
        kernel_shape=kernel_shape,
        macs=float(macs),
        params=math.prod(kernel_shape) if kernel_shape else 0,
        pinned_lhs_bits=pinned,
    )


def layer_call_interceptor(hook):
    """An `nn.intercept_methods` interceptor that hands each outermost call of a
    quantizable layer to `hook(module, kind, path, args, kwargs, next_fun)`.

    Other methods and calls nested inside a layer already being handled (a
    Dense's own submodule calls) pass straight through.
    """
    active: list[tuple[str, ...]] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        kind = layer_kind(module)
        path = tuple(module.path)
        if kind is None or context.method_name != "__call__" or path in active:
            return next_fun(*args, **kwargs)
        active.append(path)
        try:
            return hook(module, kind, path, args, kwargs, next_fun)
        finally:
            active.pop()

    return interceptor


def build_registry(
    model: nn.Module,
    variables: Any,
    *args,
    batch_size: int | None = None,
    softmax_matmuls: Sequence[str] = SOFTMAX_MATMULS,
    **apply_kwargs,
) -> LayerRegistry:
    """Traces `model.apply(variables, *args, **apply_kwargs)` abstractly and lists
    its quantizable layers. `variables` and `args` may be arrays or
    `jax.ShapeDtypeStruct`s; MACs are divided by `batch_size` (default: the first
    argument's leading dimension) to give MACs per sample."""
    records: dict[tuple[str, ...], LayerInfo] = {}

    def record(module, kind, path, call_args, call_kwargs, next_fun):
        out = next_fun(*call_args, **call_kwargs)
        rec = _record(module, kind, call_args, out, tuple(softmax_matmuls))
        if path in records:  # a shared layer called again: add its MACs
            old = records[path]
            rec = dataclasses.replace(
                old, macs=old.macs + rec.macs, calls=old.calls + 1
            )
        records[path] = rec
        return out

    recorder = layer_call_interceptor(record)
    with nn.intercept_methods(recorder):
        jax.eval_shape(
            lambda v, *a: model.apply(v, *a, **apply_kwargs), variables, *args
        )
    if batch_size is None:
        batch_size = int(jax.tree.leaves(args)[0].shape[0]) if args else 1
    layers = tuple(
        dataclasses.replace(r, macs=r.macs / batch_size) for r in records.values()
    )
    if not layers:
        raise UserError(
            f"{type(model).__name__} has no nn.Conv, nn.Dense or MatMul layer to quantize."
        )
    return LayerRegistry(layers)


def unet_registry(config) -> LayerRegistry:
    """The registry of a `tmpq_jax.models.UNet` for `config`, at its resolution."""
    from tmpq_jax.models.unet import UNet

    model = UNet(config)
    x = jax.ShapeDtypeStruct(
        (1, config.image_size, config.image_size, config.channels), jnp.float32
    )
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    return build_registry(model, variables, x, t)


def _fmt_int(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def _fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


def _table_row(i: int, layer: LayerInfo) -> tuple[str, ...]:
    pinned = layer.pinned_lhs_bits
    return (
        str(i),
        layer.name,
        layer.kind + (f" (lhs {pinned}b)" if pinned else ""),
        ", ".join(_fmt_shape(s) for s in layer.in_shapes),
        _fmt_shape(layer.out_shape),
        _fmt_shape(layer.kernel_shape),
        _fmt_int(layer.macs),
        _fmt_int(layer.params),
    )


def format_registry(registry: LayerRegistry) -> str:
    """The registry as a fixed-width table (index, name, kind, shapes, MACs, params)."""
    head = ("#", "name", "kind", "input", "output", "kernel", "MACs/sample", "params")
    macs, params = _fmt_int(registry.macs.sum()), _fmt_int(registry.params.sum())
    total = ("", "total", "", "", "", "", macs, params)
    rows = [head, *(_table_row(i, layer) for i, layer in enumerate(registry)), total]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    right = {0, 6, 7}  # numbers

    def fmt(row):
        cells = zip(row, widths, strict=True)
        out = [
            v.rjust(w) if c in right else v.ljust(w) for c, (v, w) in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *map(fmt, rows[1:-1]), sep, fmt(total)])


def print_registry(registry: LayerRegistry, file=None) -> None:
    print(format_registry(registry), file=file)
