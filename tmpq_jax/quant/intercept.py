"""Operation-level interception: every matmul and convolution a model runs.

TMPQ-DM (arXiv 2404.09532) gives every conv and linear layer, and both operands of
every attention matmul, their own bits. Matching module *types* misses whatever a
model computes outside them (`nn.MultiHeadDotProductAttention`'s q.k and p.v, a
bare `jnp.einsum`, `DenseGeneral`, NNX layers), so the quantizer intercepts the two
primitives every such computation ends in: `lax.dot_general_p` (dot, matmul,
einsum, tensordot, Dense, DenseGeneral, Einsum, attention) and
`lax.conv_general_dilated_p` (Conv, ConvTranspose, conv_transpose).

The idea is Qwix's (`qwix/_src/interception.py`): patch while a model runs, key
each op by the module that runs it. Qwix patches the public functions; this patches
the primitives' `bind`, which also sees what jax's own code calls internally
(`jnp.matmul` does not go through `jax.lax.dot_general`). Under an active
`intercept(handler)`:

* jitted helpers are inlined (`jax.disable_jit`), or a helper traced before would
  replay its cached jaxpr and skip the hook (`jnp.einsum` is jitted). Inside the
  model this also unrolls `lax.scan`: fine for the forward passes of diffusion
  models (loops over steps stay outside the model);
* each outermost bind of the two primitives becomes an `OpCall` handed to
  `handler`, which returns the op's output. Binds made while a handler runs
  (its own quantized op, batching rules) pass straight through;
* `jax.nn.dot_product_attention` runs as two einsums and a softmax (jax's own
  vmaps over head groups, so its ops would reach handlers as slices);
* the op's *site* is (module path, method, index within that method call): the
  innermost Linen or NNX module on the Python stack, found as Qwix finds it.
  Repeated calls of a module reach the same sites. NNX modules have no path of
  their own: `nnx_paths(model)` names them by their attribute path.

Hooks stay installed once made; with no handler active they only forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

PRIMITIVES = {
    "dot_general": jax.lax.dot_general_p,
    "conv": jax.lax.conv_general_dilated_p,
}


@dataclasses.dataclass(frozen=True)
class Site:
    """Where an op runs: module path, method and its index among that call's ops."""

    path: tuple[str, ...]
    method: str
    index: int
    module_type: str = ""


@dataclasses.dataclass
class OpCall:
    """One intercepted dot_general or convolution, as bound."""

    prim: str  # "dot_general" | "conv"
    lhs: Any
    rhs: Any
    params: dict  # the primitive's parameters
    site: Site
    _bind: Callable = dataclasses.field(repr=False)

    def original(self, lhs=None, rhs=None):
        """The op itself (float), on these operands or its own."""
        lhs = self.lhs if lhs is None else lhs
        rhs = self.rhs if rhs is None else rhs
        return self._bind(lhs, rhs, **self.params)

    @property
    def out_dtype(self):
        pref = self.params.get("preferred_element_type")
        return pref if pref is not None else jax.numpy.result_type(self.lhs, self.rhs)


class _State(threading.local):
    def __init__(self):
        self.handlers: list[Callable[[OpCall], Any]] = []
        self.depth = 0  # > 0 while a handler (or a watched bind) runs
        self.counts: dict[int, int] = {}
        self.frames: list[Any] = []  # keeps counted frames alive: ids stay unique
        self.nnx_paths: dict[int, tuple[str, ...]] = {}
        self.watchers: list[Callable] = []


_state = _State()
_lock = threading.Lock()
_installed: dict[str, Callable] = {}  # primitive name -> original bind


def _module_frame():
    """(module, frame) of the innermost Linen/NNX module method on the stack."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name != "<lambda>" and "self" in f.f_code.co_varnames:
            s = f.f_locals.get("self")
            if isinstance(s, nn.Module | nnx.Module):
                return s, f
        f = f.f_back
    return None, None


def _path_of(module) -> tuple[str, ...]:
    if isinstance(module, nn.Module):
        return tuple(module.path) if module.scope is not None else ()
    path = _state.nnx_paths.get(id(module))
    if path is None:
        from tmpq_jax.errors import UserError

        raise UserError(
            f"an NNX {type(module).__name__} ran without a known path; run NNX "
            "models through tmpq_jax.models.NNXModel."
        )
    return path


def _site() -> Site:
    module, frame = _module_frame()
    if module is None:
        return Site((), "", _count(None), "")
    return Site(
        _path_of(module),
        frame.f_code.co_name,
        _count(frame),
        type(module).__name__,
    )


def _count(frame) -> int:
    key = id(frame)
    n = _state.counts.get(key, 0)
    _state.counts[key] = n + 1
    if frame is not None and n == 0:
        _state.frames.append(frame)
    return n


def _hook(prim_name: str, original: Callable) -> Callable:
    def bind(*args, **params):
        st = _state
        if st.depth or not (st.handlers or st.watchers):
            return original(*args, **params)
        if prim_name not in PRIMITIVES or not st.handlers:
            st.depth += 1
            try:
                out = original(*args, **params)
            finally:
                st.depth -= 1
            for watch in st.watchers:
                watch(prim_name, args, params, out)
            return out
        call = OpCall(prim_name, args[0], args[1], params, _site(), original)
        st.depth += 1
        try:
            return st.handlers[-1](call)
        finally:
            st.depth -= 1

    return bind


def _install(prims: dict[str, Any]) -> None:
    with _lock:
        for name, prim in prims.items():
            if name not in _installed:
                _installed[name] = prim.bind
                prim.bind = _hook(name, prim.bind)


@contextlib.contextmanager
def _fresh_counts() -> Iterator[None]:
    saved = _state.counts, _state.frames
    _state.counts, _state.frames = {}, []
    try:
        yield
    finally:
        _state.counts, _state.frames = saved


def _plain_attention(query, key, value, bias=None, mask=None, **kw):
    """`jax.nn.dot_product_attention` as two einsums and a softmax, no vmap.

    jax's XLA version vmaps over query-head groups, which would hand handlers the
    q.k and p.v operands as slices of an inner vmap (a collected value would leak
    out of it). Sequence lengths and local windows go to jax's own version."""
    extra = {
        k: v for k, v in kw.items() if k not in ("scale", "is_causal", "implementation")
    }
    if any(v is not None and v is not False for v in extra.values()):
        return _ORIGINAL_ATTENTION(query, key, value, bias, mask, **kw)
    jnp = jax.numpy
    n, k = query.shape[-2], key.shape[-2]
    if n != k:  # grouped-query attention: every query head sees its group's k, v
        key, value = (
            jnp.repeat(key, n // k, axis=-2),
            jnp.repeat(value, n // k, axis=-2),
        )
    scale = kw.get("scale") or 1.0 / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    logits = jnp.einsum("...tnh,...snh->...nts", query, key) * scale
    if bias is not None:
        logits = logits + bias
    if kw.get("is_causal"):
        t, s_ = logits.shape[-2:]
        mask = (
            jnp.tril(jnp.ones((t, s_), bool))
            if mask is None
            else mask & jnp.tril(jnp.ones((t, s_), bool))
        )
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    return jnp.einsum("...nts,...snh->...tnh", probs, value)


_ORIGINAL_ATTENTION = jax.nn.dot_product_attention


@contextlib.contextmanager
def intercept(handler: Callable[[OpCall], Any]) -> Iterator[None]:
    """Within: every outermost dot_general / convolution is `handler(OpCall)`."""
    _install(PRIMITIVES)
    _state.handlers.append(handler)
    saved = jax.nn.dot_product_attention
    jax.nn.dot_product_attention = _plain_attention
    try:
        with _fresh_counts(), jax.disable_jit():
            yield
    finally:
        jax.nn.dot_product_attention = saved
        _state.handlers.pop()


@contextlib.contextmanager
def watch(prims: dict[str, Any], fn: Callable) -> Iterator[None]:
    """Within: `fn(name, args, params, out)` after each outermost bind of `prims`
    (value provenance for the registry: which operand is a softmax output)."""
    _install(prims)
    _state.watchers.append(fn)
    try:
        yield
    finally:
        _state.watchers.remove(fn)


@contextlib.contextmanager
def nnx_paths(model: nnx.Module) -> Iterator[None]:
    """Names the NNX modules of `model` by their attribute paths while within."""
    saved = _state.nnx_paths
    paths = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and id(node) not in paths:
            paths[id(node)] = tuple(str(p) for p in path)
    _state.nnx_paths = saved | paths
    try:
        yield
    finally:
        _state.nnx_paths = saved
