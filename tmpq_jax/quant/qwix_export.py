"""A frozen genome served by Qwix: per-layer PTQ rules + the params Qwix serves.

TMPQ-DM (arXiv 2404.09532) ends with one genome, which `export.convert` freezes
with AQT (int8 kernels, per-channel scales, static activation ranges). Qwix
(`qwix==0.1.8`, AQT's successor) serves a model from `QuantizationRule`s matched
by module path, and a PTQ param tree. `to_qwix` re-packs the CONVERT result into
that form, so stock `qwix.PtqProvider` serves the very weights SERVE serves:

  * one rule per (module path, Qwix op name), the path an escaped regex;
    `weight_qtype` / `act_qtype` from the genome's widths: 8 and 4 bits are
    Qwix's native int8 / int4, 2, 3, 5, 6, 7 bits its emulated "int2".."int7"
    (clipped to that width, in an int4 / int8 container); static activation
    scales, a lone conv/dense op's range also as `fixed,-b,b`;
  * the params: each kernel a Qwix `QArray` (our integer qvalue, our per-channel
    scale), each activation's static scale (`<op>_lhs_scale`, `<op>_rhs_scale`)
    from the calibrated range, biases and norms as they are; a calibrated bias
    correction folded into the layer's bias.

Where Qwix 0.1.8 needs more than a qtype per layer (refused in one line, never
rounded; `docs/qwix.md`):
  * a convolution quantizes both operands into one container (ptq.py: "requires
    same act_qtype and weight_qtype"): its rule takes the activation's qtype and
    the kernel keeps its own integer grid in that int8 container. Activations of
    <= 4 bits are refused: XLA's CPU/GPU backends reject int4 convolutions;
  * a dense op with both widths <= 4 keeps its kernel in an int8 container: XLA
    rejects int4 x int4 dots;
  * an attention matmul quantizes both activations at one `act_qtype`: different
    widths (the softmax operand is held at 8), or two <= 4-bit ones, are refused,
    or with `matmul_fallback="float"` served in float and reported, as is any
    matmul that shares its module and op name with one of those (Flax's
    `nn.MultiHeadDotProductAttention`: q.k and p.v are two einsums of one module);
  * dynamic activation ranges (Qwix's are per row, SERVE's per tensor), a weight
    that is not the right operand of an op of its own module, an op Qwix does
    not see, a module whose ops need different rules.

Numerics (tests/test_qwix_export.py): kernels are bit-identical and so is every
activation inside its calibrated range; Qwix's b-bit grid reaches -2**(b-1),
AQT's stops at -(2**(b-1) - 1), so a value below the range is one step apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError
from tmpq_jax.quant import numerics
from tmpq_jax.quant.export import COLLECTION, QuantizedModel, check_freezable
from tmpq_jax.quant.registry import LayerRegistry

QWIX_VERSION = "0.1.8"  # the version this export is written and tested against
FORMAT = "tmpq-qwix-export"
VERSION = 1
META_FILE = "qwix_export.json"
PARAMS_FILE = "params.npz"
MATMUL_FALLBACK = ("refuse", "float")
_QWIX_OPS = {
    "conv": ("conv_general_dilated",),
    "dot_general": ("dot_general", "einsum"),
}


def check_qwix():
    """The `qwix` module, or a one-line UserError naming what it lacks."""
    try:
        import qwix
        from qwix._src.core import numerics as qn
        from qwix._src.utils import flax_util
    except ImportError as e:
        raise UserError(
            f"the Qwix export needs qwix ({e}); pip install qwix=={QWIX_VERSION}."
        ) from None
    fields = dict(op_names=(), act_static_scale=True, act_calibration_method=None)
    probes = {  # what the export and its loader use, each probed
        "qwix.PtqProvider": lambda: qwix.PtqProvider._get_current_rule_and_op_id,
        "qwix.quantize_model": lambda: qwix.quantize_model,
        "qwix.process_prequantized_params": lambda: qwix.process_prequantized_params,
        "QuantizationRule's fields": lambda: qwix.QuantizationRule(**fields),
        "get_current_module_path": lambda: flax_util.get_current_module_path,
        "the emulated qtype 'int6'": lambda: qn.get_symmetric_bound("int6") == 31.5,
    }
    for what, probe in probes.items():
        try:
            ok = bool(probe())
        except (AttributeError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(
                f"qwix {getattr(qwix, '__version__', '?')} lacks {what}, which the "
                f"Qwix export needs; pip install qwix=={QWIX_VERSION}."
            )
    return qwix


def qtype_name(bits: int) -> str:
    """Qwix's qtype for a width: native int8 / int4, emulated int2..int7."""
    bits = int(bits)
    if not numerics.MIN_BITS <= bits <= numerics.MAX_BITS:
        raise UserError(f"width {bits}: Qwix serves 2 to 8 bits.")
    return f"int{bits}"


def qtype(name: str | None):
    """A qtype name as Qwix takes it: jnp.int8 / jnp.int4, else the string."""
    return {"int8": jnp.int8, "int4": jnp.int4}.get(name, name)


def _container_bits(name: str) -> int:
    return 4 if int(name[3:]) <= 4 else 8


# ----------------------------------------------------------------------------
# Which op is which: one recording run of the model under Qwix.


@dataclasses.dataclass(frozen=True)
class QwixOp:
    """One op as Qwix intercepts it: module path, op name, op id, operands."""

    path: str
    op_name: str  # conv_general_dilated | dot_general | einsum
    op_id: str  # e.g. "einsum0": names its static scales
    shapes: tuple
    equation: str | None = None


def _recorder(qwix):
    """A PtqProvider with no rules (every op float) listing the ops it sees."""
    from qwix._src.utils import flax_util

    class Recorder(qwix.PtqProvider):
        def __init__(self):
            super().__init__([])
            self.ops: list[QwixOp] = []
            self._pending: tuple = ((), None)

        def _get_current_rule_and_op_id(self, op_name, **kw):
            rule, op_id = super()._get_current_rule_and_op_id(op_name, **kw)
            if not kw.get("only_rule") and not kw.get("repeated_call"):
                path = "/".join(map(str, flax_util.get_current_module_path()))
                shapes, eq = self._pending
                self.ops.append(QwixOp(path, op_name, op_id, shapes, eq))
            return rule, op_id

        def _note(self, operands, eq=None):
            self._pending = (
                tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands),
                eq,
            )

        def dot_general(self, lhs, rhs, *args, **kwargs):
            self._note((lhs, rhs))
            return super().dot_general(lhs, rhs, *args, **kwargs)

        def einsum(self, equation, *operands, **kwargs):
            self._note(operands, equation)
            return super().einsum(equation, *operands, **kwargs)

        def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
            self._note((lhs, rhs))
            return super().conv_general_dilated(lhs, rhs, *args, **kwargs)

    return Recorder()


def _is_nnx(model) -> bool:
    return hasattr(model, "merge") and hasattr(model, "graphdef")


def zeros_of(args):
    return [jnp.zeros(a.shape, a.dtype) for a in args]


def _qwix_params(qwix, model, params, provider, example_args):
    """The abstract 'params' tree (nested dict) of `model` quantized by Qwix."""
    from flax import nnx

    if _is_nnx(model):  # tmpq_jax.models.NNXModel: Qwix takes the nnx.Module
        module = model.merge(params)
        qm = nnx.eval_shape(
            lambda: qwix.quantize_model(module, provider, *zeros_of(example_args))
        )
        return nnx.to_pure_dict(nnx.state(qm, nnx.Param))
    qm = qwix.quantize_model(model, provider)
    tree = jax.eval_shape(lambda: qm.init(jax.random.key(0), *zeros_of(example_args)))
    return tree["params"]


# ----------------------------------------------------------------------------
# Rules.


@dataclasses.dataclass
class _Entry:
    """One registry op matched to its Qwix op, and how Qwix serves it."""

    name: str
    op: QwixOp
    layer: int | None  # registry index; None: an op the registry keeps in float
    rule: tuple | None = None  # (weight_qtype, act_qtype) names
    matmul: bool = False  # two activations (both operands quantized per tensor)
    lhs_is_left: bool = True  # matmul: Qwix's lhs is our canonical left operand
    note: str = ""


def _match(registry: LayerRegistry, ops: Sequence[QwixOp]) -> list[_Entry]:
    """Registry ops (layers and float ops) matched to Qwix's, module by module."""
    ours: dict[str, list] = {}
    for i, layer in enumerate(registry):
        ours.setdefault("/".join(layer.site.path), []).append((layer.site, i, layer))
    for op in registry.float_ops:
        ours.setdefault("/".join(op.site.path), []).append((op.site, None, op))
    seen: dict[str, list[QwixOp]] = {}
    for op in ops:
        seen.setdefault(op.path, []).append(op)
    entries = []
    for path, mine in ours.items():
        theirs = seen.pop(path, [])
        mine = sorted(mine, key=lambda m: (m[0].method, m[0].index))
        if len(theirs) != len(mine):
            raise UserError(
                f"module {path or '(root)'!r}: Qwix intercepts {len(theirs)} ops "
                f"where tmpq_jax sees {len(mine)} (a module called twice, or an op "
                "Qwix does not intercept); export --format aqt instead."
            )
        for (_, i, item), op in zip(mine, theirs, strict=True):
            kind = "conv" if i is not None and item.kind == "conv" else "dot_general"
            if i is not None and op.op_name not in _QWIX_OPS[kind]:
                raise UserError(
                    f"layer {item.name!r} is a {item.kind} but Qwix sees a "
                    f"{op.op_name} there; export --format aqt instead."
                )
            entries.append(_Entry(item.name, op, i))
    if seen:
        path = next(iter(seen))
        raise UserError(
            f"Qwix intercepts ops in module {path or '(root)'!r} that tmpq_jax does "
            "not see; export --format aqt instead."
        )
    return entries


def _plan(entry: _Entry, registry, w_bits, a_bits, matmul_fallback: str) -> None:
    """Sets `entry.rule` (the qtypes Qwix runs it with) or refuses it.

    XLA's CPU/GPU backends reject int4 x int4 dots and any int4 convolution, so
    no op may have both operands in int4 containers (widths <= 4)."""
    if entry.layer is None:
        entry.note = "kept in float (keep_float)"
        return
    layer = registry[entry.layer]
    w, a = int(w_bits[entry.layer]), int(a_bits[entry.layer])
    left = int(layer.pinned_lhs_bits or a)
    if layer.kind == "conv":
        if a <= 4:
            raise UserError(
                f"layer {layer.name!r} (conv, W{w}A{a}): Qwix quantizes both conv "
                "operands into one container, int4 for activations of 4 bits or "
                "fewer, and XLA's CPU/GPU backends reject int4 convolutions; give "
                "its activations 5 to 8 bits, or export --format aqt."
            )
        entry.rule = (qtype_name(a), qtype_name(a))  # Qwix: one qtype for both
        if w != a:
            entry.note = f"{w}-bit kernel in the int8 container of an int{a} rule"
        return
    if layer.kind == "dense":
        entry.rule = (qtype_name(w), qtype_name(a))
        if w <= 4 and a <= 4:
            entry.rule = ("int8", qtype_name(a))
            entry.note = f"{w}-bit kernel in an int8 container (no int4 x int4 dot)"
        return
    entry.matmul = True
    why = None
    if w != left:
        why = f"multiplies two activations at {left} and {w} bits; Qwix quantizes "
        why += "both operands of such a matmul at one width (the softmax one is 8)"
    elif w <= 4:
        why = f"multiplies two {w}-bit activations; Qwix would run int4 x int4, "
        why += "which XLA's CPU/GPU backends reject"
    if why is not None:
        if matmul_fallback == "float":
            entry.note = f"float: {why}"
            return
        raise UserError(
            f"layer {layer.name!r} {why}: pass --matmul-fallback float to serve such "
            "matmuls in float, or export --format aqt."
        )
    entry.rule = (qtype_name(w), qtype_name(w))
    swapped = False
    if entry.op.op_name == "einsum":
        swapped = numerics._einsum_swaps(entry.op.equation, *entry.op.shapes[:2])
    entry.lhs_is_left = swapped == layer.swap


def _groups(entries: Sequence[_Entry]) -> dict[tuple, list[_Entry]]:
    """Entries by (module path, Qwix op name): what one Qwix rule matches."""
    groups: dict[tuple, list[_Entry]] = {}
    for e in entries:
        groups.setdefault((e.op.path, e.op.op_name), []).append(e)
    return groups


def _float_shared(entries: Sequence[_Entry]) -> None:
    """matmul_fallback="float": a module's matmuls that need different rules all
    go to float. Flax's `nn.MultiHeadDotProductAttention` runs q.k and p.v as two
    einsums of one module, and a Qwix rule cannot tell them apart, so a p.v
    served in float (or at 8 bits beside a narrower q.k) takes q.k with it."""
    for group in _groups(entries).values():
        if len({e.rule for e in group}) > 1 and all(e.matmul for e in group):
            for e in group:
                if e.rule is not None:
                    e.rule = None
                    e.note = "float: its module's other matmul needs another rule"


def _rules(entries: Sequence[_Entry], bounds: np.ndarray) -> list[dict]:
    """One rule (a JSON dict) per (module path, Qwix op name) holding quantized ops.

    A conv or dense op alone in its group also gets its calibrated activation
    range as `act_calibration_method="fixed,-b,b"` (Qwix's static range, which
    gives the scale the params hold); a matmul's two ranges live in the params."""
    rules = []
    for (path, op_name), group in _groups(entries).items():
        kinds = {e.rule for e in group}
        if kinds == {None}:
            continue
        if len(kinds) > 1:
            raise UserError(
                f"layers {[e.name for e in group]} run {op_name} in module "
                f"{path or '(root)'!r} at different widths (or some in float); a "
                "Qwix rule matches a module and an op name, not one call: give them "
                "one width, pass --matmul-fallback float (attention matmuls), or "
                "export --format aqt."
            )
        w, a = group[0].rule
        method = None
        if len(group) == 1 and not group[0].matmul:
            b = float(bounds[group[0].layer, 0]) or 1.0  # SERVE: a 0 range is 1
            method = f"fixed,{-b!r},{b!r}"
        rules.append(
            dict(
                module_path=re.escape(path),
                op_names=[op_name],
                weight_qtype=w,
                act_qtype=a,
                act_static_scale=True,
                act_calibration_method=method,
                weight_calibration_method="absmax",
            )
        )
    return rules


# ----------------------------------------------------------------------------
# Params: the AQT CONVERT result in Qwix's PTQ layout.


def key_path(path) -> list:
    """A pytree key path as its keys (Qwix's layout: `kernel/array/qvalue`)."""
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


def _get(tree: Any, path: Sequence) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def flat_key(segments: Sequence) -> str:
    return "/".join(map(str, segments))


_SCALE = re.compile(r"(.+)_(lhs|rhs)_scale$")


def _param_values(
    template: Any,
    entries: Sequence[_Entry],
    registry: LayerRegistry,
    qmodel: QuantizedModel,
) -> dict[str, np.ndarray]:
    """Every leaf of Qwix's abstract params `template`, keyed `flat_key`."""
    params, store = qmodel.variables["params"], qmodel.variables[COLLECTION]
    bits = np.asarray(qmodel.bits.w_bits), np.asarray(qmodel.bits.a_bits)
    bounds = np.asarray(qmodel.act_bound)
    by_param = {
        tuple(map(str, registry[e.layer].param_path)): e
        for e in entries
        if e.rule is not None and not e.matmul
    }
    by_op = {(e.op.path, e.op.op_id): e for e in entries if e.rule is not None}
    folded = {}  # bias path -> bias minus the calibrated correction
    for e in by_param.values():
        corr = store[f"{e.layer:04d}"].get("bias_corr")
        if corr is None:
            continue
        bias_path = (*registry[e.layer].param_path[:-1], "bias")
        try:
            bias = np.asarray(_get(params, bias_path))
        except (KeyError, TypeError):
            bias = None
        if bias is None or bias.size != np.size(corr):
            raise UserError(
                f"layer {e.name!r} has a calibrated bias correction but no bias to "
                "fold it into (Qwix has no output correction); export a genome "
                "calibrated without --bias-correction, or --format aqt."
            )
        folded[tuple(map(str, bias_path))] = bias - np.reshape(corr, bias.shape)
    out, used = {}, set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        seg = key_path(path)
        key, where = flat_key(seg), tuple(map(str, seg[:-2]))
        boxed = len(seg) > 1 and seg[-2] == "array"  # Qwix's WithAux
        scale = _SCALE.match(str(seg[-2])) if seg[-1] == "array" else None
        if boxed and seg[-1] in ("qvalue", "scale") and where in by_param:
            e = by_param[where]
            layer = registry[e.layer]
            used.add(e.name)
            if seg[-1] == "qvalue":
                value = np.asarray(_get(params, layer.param_path))
                cap = 2 ** (_container_bits(e.rule[0]) - 1) - 1
                if np.abs(value).max(initial=0) > cap:  # never: widths are checked
                    raise AssertionError(f"{e.name}: qvalue outside int{e.rule[0]}")
            else:
                value = np.asarray(store[f"{e.layer:04d}"]["scale"])
        elif scale and (flat_key(seg[:-2]), scale[1]) in by_op:
            e = by_op[(flat_key(seg[:-2]), scale[1])]
            used.add((e.name, scale[2]))
            left = scale[2] == "lhs" if e.lhs_is_left else scale[2] == "rhs"
            i = e.layer
            b = int(registry[i].pinned_lhs_bits or bits[1][i]) if left else bits[0][i]
            bound = float(bounds[i, 0 if left else 1]) or 1.0
            value = np.float32(bound) / (np.float32(2.0 ** (int(b) - 1)) - 0.5)
            value = np.broadcast_to(value, leaf.shape)
        elif tuple(map(str, seg)) in folded:
            value = folded[tuple(map(str, seg))]
        else:
            try:
                value = np.asarray(_get(params, seg))
            except (KeyError, TypeError, IndexError):
                raise UserError(
                    f"Qwix's model has a param {key!r} that the genome's model "
                    "lacks; export --format aqt instead."
                ) from None
        if value.size != int(np.prod(leaf.shape)):
            raise UserError(
                f"param {key!r}: Qwix wants shape {leaf.shape}, the frozen model "
                f"has {value.shape}; export --format aqt instead."
            )
        out[key] = np.reshape(value, leaf.shape)
    for e in by_op.values():
        need = [e.name] if not e.matmul else []
        need += [(e.name, "lhs")] + ([(e.name, "rhs")] if e.matmul else [])
        if not used.issuperset(need):
            raise UserError(
                f"Qwix does not quantize layer {e.name!r} as tmpq_jax does (its "
                "weight must be the right operand of an op run by the module that "
                "holds it); export --format aqt instead."
            )
    return out


# ----------------------------------------------------------------------------
# The export.


@dataclasses.dataclass(frozen=True)
class QwixExport:
    """Qwix PTQ rules (JSON dicts), Qwix's params (flat, `flat_key` -> array;
    kernels' qvalues in int8), and one report row per registry op."""

    rules: list[dict]
    arrays: dict[str, np.ndarray]
    layers: list[dict]
    example_inputs: list  # [[shape, dtype], ...]: the inputs the rules were made on


def to_qwix(
    model: Any,
    qmodel: QuantizedModel,
    registry: LayerRegistry,
    example_args: Sequence[Any],
    *,
    float_params: Any = None,
    matmul_fallback: str = "refuse",
) -> QwixExport:
    """The frozen genome `qmodel` (`export.convert`) as Qwix PTQ rules + params.

    `model`: the Linen module or `tmpq_jax.models.NNXModel` the registry was built
    for; `example_args`: its inputs (arrays or ShapeDtypeStructs, batch 1);
    `float_params`: an NNX model's float params (default: `qmodel`'s, its int8
    kernels cast to float; only their shapes are used). UserError for whatever Qwix cannot serve (module docstring)."""
    qwix = check_qwix()
    if matmul_fallback not in MATMUL_FALLBACK:
        raise UserError(
            f"matmul_fallback={matmul_fallback!r}: use one of {MATMUL_FALLBACK}."
        )
    check_freezable(registry)
    if qmodel.act_bound is None:
        raise UserError(
            "the genome's activations have dynamic ranges; Qwix's dynamic scales "
            "are per row, the SERVE path's per tensor: export a genome with a "
            "calibration (static ranges)."
        )
    example_args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in example_args]
    if _is_nnx(model) and float_params is None:  # only shapes matter here
        float_params = jax.tree.map(
            lambda w: w.astype(jnp.float32) if w.dtype == jnp.int8 else w,
            qmodel.variables["params"],
        )
    recorder = _recorder(qwix)
    _qwix_params(qwix, model, float_params, recorder, example_args)
    entries = _match(registry, recorder.ops)
    w_bits, a_bits = np.asarray(qmodel.bits.w_bits), np.asarray(qmodel.bits.a_bits)
    for e in entries:
        _plan(e, registry, w_bits, a_bits, matmul_fallback)
    if matmul_fallback == "float":
        _float_shared(entries)
    bounds = np.asarray(qmodel.act_bound)
    rules = _rules(entries, bounds)
    provider = qwix.PtqProvider([make_rule(qwix, r) for r in rules])
    template = _qwix_params(qwix, model, float_params, provider, example_args)
    arrays = _param_values(template, entries, registry, qmodel)
    layers = [_report(e, registry, w_bits, a_bits) for e in entries]
    inputs = [[list(a.shape), jnp.dtype(a.dtype).name] for a in example_args]
    return QwixExport(rules, arrays, layers, inputs)


def _report(e: _Entry, registry, w_bits, a_bits) -> dict:
    row = dict(name=e.name, module_path=e.op.path, qwix_op=e.op.op_id)
    if e.layer is not None:
        layer = registry[e.layer]
        left = int(layer.pinned_lhs_bits or a_bits[e.layer])
        row.update(kind=layer.kind, w_bits=int(w_bits[e.layer]), a_bits=left)
    row["served"] = "float" if e.rule is None else "qwix"
    if e.rule is not None:
        row.update(weight_qtype=e.rule[0], act_qtype=e.rule[1])
    if e.note:
        row["note"] = e.note
    return row


def make_rule(qwix, d: dict):
    """A `qwix.QuantizationRule` from its JSON dict."""
    d = dict(d)
    d["weight_qtype"], d["act_qtype"] = qtype(d["weight_qtype"]), qtype(d["act_qtype"])
    d["op_names"] = tuple(d["op_names"])
    return qwix.QuantizationRule(**d)
