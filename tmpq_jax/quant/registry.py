"""The ordered list of a model's matmuls and convolutions, computed from a trace.

TMPQ-DM (arXiv 2404.09532) gives every conv and linear layer a weight gene and an
activation gene, and every attention matmul activation genes; its cost model needs
each layer's MACs and parameter count. `build_registry` traces the model once,
abstractly, with every `dot_general` and convolution intercepted (`intercept.py`),
whoever calls them: `nn.Dense`, `DenseGeneral`, `Einsum`, `Conv`, `ConvTranspose`,
attention, NNX layers, or a bare `jnp.einsum` in a module. Nothing is written by
hand, so the registry follows the architecture.

Each op is classified from the computation itself:
  * "conv" / "dense": one operand does not depend on the model's inputs (a weight:
    found by vmapping the trace over the inputs; it is quantized per output
    channel, the other operand per tensor);
  * "matmul": both operands are activations (q.k, p.v), each per tensor. Its
    "left" operand is a softmax output when there is one (recognised from the
    exp / sum / divide that made it, whatever the module is called), held at
    `SOFTMAX_BITS`; otherwise the primitive's left operand.
Ops the supernet cannot quantize (integer operands, a convolution layout AQT does
not take, two constant operands) are listed in `float_ops` with the reason;
`coverage` tells what fraction of the forward's MACs is quantized.

Layer order is first-call order. A layer's name is its module path ('/'-joined),
followed by `<op>_<k>` when its module runs more than one op (`attn/dot_general_1`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError
from tmpq_jax.quant import intercept
from tmpq_jax.quant.registry_trace import trace_ops

SOFTMAX_BITS = 8
KINDS = ("conv", "dense", "matmul")
HOW_TO_LIST = "print(tmpq_jax.quant.format_registry(registry)) lists the layer names"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One quantizable op. Shapes are at the batch the registry was built with."""

    name: str
    path: tuple[str, ...]
    kind: str  # conv | dense | matmul
    in_shapes: tuple[tuple[int, ...], ...]  # (left, right) operands
    out_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...] | None  # the weight operand's shape
    macs: float  # per sample, summed over calls
    params: int  # weight elements (the quantized weights; biases stay float)
    pinned_lhs_bits: int | None  # fixed left-operand bits (a softmax output)
    calls: int = 1
    site: intercept.Site | None = None
    weight_operand: int | None = None  # primitive position of the weight (0 or 1)
    swap: bool = False  # matmul: the left operand is the primitive's right one
    channels: int = 0  # weight: output channels (per-channel scales)
    param_path: tuple[str | int, ...] | None = None  # the weight, if a param
    weight_contracting: tuple[int, ...] = ()  # the weight's contracted axes
    module_type: str = ""

    @property
    def op(self) -> str:
        return "conv" if self.kind == "conv" else "dot_general"


@dataclasses.dataclass(frozen=True)
class FloatOp:
    """A matmul or convolution the supernet leaves in float, and why."""

    name: str
    macs: float
    reason: str
    site: intercept.Site | None = None


@dataclasses.dataclass(frozen=True)
class LayerRegistry:
    """Quantizable ops in forward order; layer i owns genes w_bits[i], a_bits[i]."""

    layers: tuple[LayerInfo, ...]
    float_ops: tuple[FloatOp, ...] = ()
    _by_name: dict = dataclasses.field(
        init=False, repr=False, compare=False, hash=False
    )
    _by_site: dict = dataclasses.field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {x.name: i for i, x in enumerate(self)})
        by_site = {_site_key(op.site): None for op in self.float_ops}
        by_site |= {_site_key(x.site): i for i, x in enumerate(self)}
        object.__setattr__(self, "_by_site", by_site)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i: int) -> LayerInfo:
        return self.layers[i]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def per_step(self, forwards: int) -> LayerRegistry:
        """This registry with MACs counted per sampling step of `forwards` model
        calls (classifier-free guidance: 2), so BitOPs and budgets count them all;
        the layers themselves are unchanged."""
        if forwards == 1:
            return self
        return LayerRegistry(
            tuple(dataclasses.replace(x, macs=x.macs * forwards) for x in self),
            tuple(
                dataclasses.replace(f, macs=f.macs * forwards) for f in self.float_ops
            ),
        )

    def index(self, name: str) -> int:
        """Index of the layer called `name`; UserError if unknown."""
        i = self._by_name.get(name)
        if i is None:
            raise UserError(f"unknown layer name {name!r}; {HOW_TO_LIST}.")
        return i

    def index_of_site(self, site: intercept.Site) -> int | None:
        """Index of the op at `site`; None for an op left in float."""
        key = _site_key(site)
        if key not in self._by_site:
            raise UserError(
                f"op {site.index} of {'/'.join(site.path) or 'the model'} is not in "
                "the layer registry (built for another model?); rebuild it with "
                f"build_registry; {HOW_TO_LIST}."
            )
        return self._by_site[key]

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

    @property
    def float_macs(self) -> float:
        """MACs per sample of the ops left in float."""
        return float(sum(op.macs for op in self.float_ops))

    @property
    def coverage(self) -> float:
        """Quantized MACs over all matmul and conv MACs of one forward."""
        q = float(self.macs.sum())
        return q / (q + self.float_macs) if q + self.float_macs else 1.0


def _site_key(site: intercept.Site | None):
    return None if site is None else (site.path, site.method, site.index)


def build_registry(
    model: Any,
    variables: Any,
    *args,
    batch_size: int | None = None,
    **apply_kwargs,
) -> LayerRegistry:
    """Traces `model.apply(variables, *args, **apply_kwargs)` abstractly and lists
    its matmuls and convolutions. `variables` and `args` may be arrays or
    `jax.ShapeDtypeStruct`s; MACs are divided by `batch_size` (default: the first
    argument's leading dimension) to give MACs per sample."""
    ops = trace_ops(model, variables, args, apply_kwargs)
    if batch_size is None:
        batch_size = int(jax.tree.leaves(args)[0].shape[0]) if args else 1
    merged: dict = {}
    for op in ops:  # a module called again reaches the same sites: add its MACs
        key = _site_key(op["site"])
        if key in merged:
            merged[key]["macs"] += op["macs"]
            merged[key]["calls"] += 1
        else:
            merged[key] = dict(op, calls=1)
    names = _names([op["site"] for op in merged.values()])
    layers, floats = [], []
    for op, name in zip(merged.values(), names, strict=True):
        macs = op["macs"] / batch_size
        if op["reason"] is not None:
            floats.append(FloatOp(name, macs, op["reason"], op["site"]))
            continue
        layers.append(_layer(op, name, macs))
    if not layers:
        raise UserError(
            f"{type(model).__name__} runs no matmul or convolution to quantize."
        )
    return LayerRegistry(tuple(layers), tuple(floats))


def _layer(op: dict, name: str, macs: float) -> LayerInfo:
    site = op["site"]
    return LayerInfo(
        name=name,
        path=tuple(name.split("/")) if name else (),
        kind=op["kind"],
        in_shapes=op["in_shapes"],
        out_shape=op["out_shape"],
        kernel_shape=op["kernel_shape"],
        macs=float(macs),
        params=math.prod(op["kernel_shape"]) if op["kernel_shape"] else 0,
        pinned_lhs_bits=SOFTMAX_BITS if op["softmax_left"] else None,
        calls=op["calls"],
        site=site,
        weight_operand=op["weight_operand"],
        swap=op["swap"],
        channels=op["channels"],
        param_path=op["param_path"],
        weight_contracting=op["weight_contracting"],
        module_type=site.module_type,
    )


def _names(sites: Sequence[intercept.Site]) -> list[str]:
    """The module path; `<op>_<k>` appended where a module runs several ops."""
    per_module: dict = {}
    for s in sites:
        per_module.setdefault(s.path, []).append(s)
    out = []
    for s in sites:
        base = "/".join(s.path)
        if len(per_module[s.path]) == 1:
            out.append(base)
            continue
        k = per_module[s.path].index(s)
        method = "" if s.method in ("__call__", "") else f"{s.method}/"
        out.append("/".join(filter(None, (base, f"{method}op_{k}"))))
    return out


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
