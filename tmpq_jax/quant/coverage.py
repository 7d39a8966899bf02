"""What the supernet quantizes of a model, shown and enforced.

`format_registry` is the table `tmpq layers` prints: every quantized op (name,
kind, shapes, MACs, params), every matmul or convolution left in float with the
reason, and the coverage (quantized MACs over all matmul and conv MACs of one
forward). `check_coverage` refuses a model below 100% unless the ops left in
float are named in `keep_float`; those count in BitOPs at 16 x 16 bits
(`float_bitops`), so a budget never hides them.
"""

from __future__ import annotations

from collections.abc import Sequence

from tmpq_jax.errors import UserError
from tmpq_jax.quant.registry import LayerInfo, LayerRegistry

FLOAT_BITS = 16  # the width an op kept in float counts at in BitOPs


def check_coverage(registry: LayerRegistry, keep_float: Sequence[str] = ()) -> None:
    """UserError unless every matmul/conv is quantized or named in `keep_float`."""
    names = {op.name for op in registry.float_ops}
    unknown = sorted(set(keep_float) - names)
    if unknown:
        raise UserError(
            f"keep_float names {unknown}, which are not ops left in float "
            f"(those are: {sorted(names) or 'none'})."
        )
    missing = [op for op in registry.float_ops if op.name not in set(keep_float)]
    if missing:
        first = missing[0]
        raise UserError(
            f"{len(missing)} matmul/conv op(s) cannot be quantized (coverage "
            f"{100 * registry.coverage:.1f}%), e.g. {first.name!r}: {first.reason}; "
            "name them in keep_float to keep them in float (tmpq layers lists them)."
        )


def float_bitops(registry: LayerRegistry) -> float:
    """BitOPs per sample of the ops kept in float, at 16 x 16 bits."""
    return registry.float_macs * FLOAT_BITS * FLOAT_BITS


def _fmt_int(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def _fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


def _table_row(i: int, layer: LayerInfo) -> tuple[str, ...]:
    pinned = layer.pinned_lhs_bits
    return (
        str(i),
        layer.name,
        layer.kind + (f" (left {pinned}b)" if pinned else ""),
        ", ".join(_fmt_shape(s) for s in layer.in_shapes),
        _fmt_shape(layer.out_shape),
        _fmt_shape(layer.kernel_shape),
        _fmt_int(layer.macs),
        _fmt_int(layer.params),
    )


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]

    def fmt(row):
        cells = zip(row, widths, strict=True)
        out = [
            v.rjust(w) if c in right else v.ljust(w) for c, (v, w) in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return [fmt(rows[0]), sep, *map(fmt, rows[1:-1]), sep, fmt(rows[-1])]


def format_registry(registry: LayerRegistry) -> str:
    """The registry as fixed-width tables: quantized ops, ops left in float, coverage."""
    head = (
        "#",
        "name",
        "kind",
        "operands",
        "output",
        "weight",
        "MACs/sample",
        "params",
    )
    total = ("", "total", "", "", "", "", _fmt_int(registry.macs.sum()),
             _fmt_int(registry.params.sum()))  # fmt: skip
    rows = [head, *(_table_row(i, x) for i, x in enumerate(registry)), total]
    lines = _table(rows, {0, 6, 7})
    if registry.float_ops:
        frows = [("left in float", "MACs/sample", "reason")]
        frows += [(op.name, _fmt_int(op.macs), op.reason) for op in registry.float_ops]
        frows.append(("total", _fmt_int(registry.float_macs), ""))
        lines += ["", *_table(frows, {1})]
    q = registry.macs.sum()
    lines.append(
        f"coverage: {100 * registry.coverage:.2f}% of matmul/conv MACs quantized "
        f"({_fmt_int(q)} of {_fmt_int(q + registry.float_macs)} per sample)"
    )
    return "\n".join(lines)


def print_registry(registry: LayerRegistry, file=None) -> None:
    print(format_registry(registry), file=file)
