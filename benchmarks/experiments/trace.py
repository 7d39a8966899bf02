"""Reading a profiler trace against the compiled HLO: kernel kinds, bytes, operand types.

Pure text/JSON functions, no device: `hlo_kinds` puts every HLO instruction in a kind
(by its custom-call target, fusion kind and name, not its metadata), `hlo_bytes`
gives the nominal bytes an instruction moves, `conv_operand_types` what element types
the convolutions take, `kernel_events` picks a perfetto trace's device kernels and
`breakdown` sums them per kind. Used by `benchmarks/experiments/kernel_breakdown.py`.
"""

from __future__ import annotations

import collections
import re

import numpy as np

KINDS = (
    "convolution",
    "gemm",
    "reduction",
    "concatenate",
    "elementwise",
    "layout",
    "other",
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


_ARRAY = re.compile(r"\b(pred|[subfc]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _shape_bytes(shape: str, first_only: bool = False) -> int:
    """Bytes of an HLO shape string (`f32[8,28]{1,0}` or a tuple of them)."""
    total = 0
    for dt, dims in _ARRAY.findall(shape):
        if dt.startswith("f8"):
            size = 1
        else:
            size = _DTYPE_BYTES.get(dt) or max(1, int(dt[1:]) // 8)
        total += size * int(np.prod([int(d) for d in dims.split(",") if d]))
        if first_only:  # a custom call's (result, scratch workspace): the result
            break
    return total


def hlo_bytes(hlo_text: str) -> dict[str, int]:
    """Instruction name -> nominal bytes it moves: its result plus each distinct
    operand once (what a kernel of it reads and writes if it touches every element
    once; a fusion that slices or broadcasts an operand moves less, one that re-reads
    moves more; L2 hits are not seen; sub-byte types count a byte an element).
    Operands are read as the `%names` in the instruction's first parenthesis, which
    is how this XLA prints them (no operand shapes or layouts inline)."""
    shapes, ops = {}, {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m.groups()
        shape = line[line.index("=") + 1 : m.end(2) - len(op)]
        shapes[name] = (shape, op == "custom-call")
        args = line[m.end() :].split(")", 1)[0]
        ops[name] = dict.fromkeys(re.findall(r"%([\w.\-]+)", args))  # once each
    out = {}
    for name, operands in ops.items():
        nbytes = _shape_bytes(*shapes[name])
        for o in operands:
            if o in shapes:
                nbytes += _shape_bytes(shapes[o][0], first_only=shapes[o][1])
        out[name] = nbytes
    return out


def conv_operand_types(hlo_text: str) -> dict[str, int]:
    """How many convolutions (cuDNN custom calls or HLO convolutions) take which
    operand element types, e.g. {"s8 x s8": 36}: whether XLA runs int8 kernels."""
    types, found = {}, collections.Counter()
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            arr = _ARRAY.search(line[line.index("=") + 1 : m.end(2)])
            types[m.group(1)] = arr.group(1) if arr else "?"
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        conv = m and (m.group(2) == "convolution" or "convForward" in line)
        if conv:
            args = line[m.end() :].split(")", 1)[0]
            ops = re.findall(r"%([\w.\-]+)", args)[:2]
            found[" x ".join(types.get(o, "?") for o in ops)] += 1
    return dict(found)


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, for the instructions of optimized HLO text."""
    kinds = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m.groups()
        kinds[name] = _kind(name, op, line)
    return kinds


def _kind(name: str, op: str, line: str) -> str:
    """By the instruction's own fields (its name, custom-call target, fusion kind
    and called computation), never its metadata: a gemm's op_name may say conv."""
    if op == "custom-call":
        m = _TARGET.search(line)
        target = m.group(1).lower() if m else ""
        if "conv" in target:
            return "convolution"
        return "gemm" if ("gemm" in target or "matmul" in target) else "other"
    if op == "fusion":
        calls = _CALLS.search(line)
        callee = calls.group(1).lower() if calls else ""
        if "kind=kCustom" in line:
            return "convolution" if "conv" in callee else "gemm"
        if "kind=kInput" in line:  # XLA emits concatenations as input fusions too
            low = name.lower()
            return (
                "concatenate"
                if "concatenate" in low and "reduce" not in low
                else "reduction"
            )
        if "kind=kLoop" in line:
            return "elementwise"
        return "other"
    if op in ("copy", "transpose", "copy-start", "copy-done"):
        return "layout"
    if op in ("convolution",):
        return "convolution"
    if op in ("dot",):
        return "gemm"
    if op in ("reduce", "reduce-window"):
        return "reduction"
    if op == "concatenate":
        return "concatenate"
    return "other"


def _kind_by_name(kernel: str) -> str:
    """Fallback for kernels without an `hlo_op`, by the kernel's own name."""
    low = kernel.lower()
    if any(s in low for s in ("conv", "fprop", "dgrad", "wgrad", "implicit")):
        return "convolution"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "matmul")):
        return "gemm"
    if "reduce" in low or "reduction" in low:
        return "reduction"
    if "transpose" in low or "copy" in low:
        return "layout"
    return "other"


def kernel_events(trace: dict) -> list[dict]:
    """The device's kernel events of a perfetto trace: on GPU the stream lines of
    the device process (its other lines repeat the same kernels); elsewhere the
    events that name an hlo_op (on the CPU these overlap across threads, so the
    kinds' shares are of summed thread time, not of wall time)."""
    ev = trace.get("traceEvents", [])
    procs = {e["pid"]: e["args"]["name"] for e in ev if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in ev
        if e.get("name") == "thread_name"
    }
    dev = {p for p, n in procs.items() if "/device:GPU" in n}
    out = []
    for e in ev:
        if e.get("ph") != "X":
            continue
        if dev:
            line = threads.get((e["pid"], e.get("tid")), "")
            if e["pid"] in dev and line.startswith("Stream"):
                out.append(e)
        elif "hlo_op" in e.get("args", {}):
            out.append(e)
    return out


def breakdown(
    events: list[dict],
    kinds: dict[str, str],
    repeats: int,
    nbytes: dict[str, int] | None = None,
) -> dict:
    """Per-run microseconds by kind, and the costliest kernels; with `nbytes`
    (`hlo_bytes`), the nominal bytes each kind moves and the bandwidth that is."""
    by_kind, bytes_by_kind = collections.Counter(), collections.Counter()
    by_kernel, bytes_by_kernel = collections.Counter(), collections.Counter()
    nbytes = nbytes or {}
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        kind = kinds.get(op) if op else None
        kind = kind or _kind_by_name(e["name"])
        key = (kind, op or "", e["name"][:100])
        by_kind[kind] += e["dur"] / repeats
        by_kernel[key] += e["dur"] / repeats
        b = nbytes.get(op, 0) / repeats if op else 0.0
        bytes_by_kind[kind] += b
        bytes_by_kernel[key] += b
    busy = sum(by_kind.values())
    row = dict(
        busy_us=busy,
        kernels_per_run=len(events) / repeats,
        us_by_kind={k: by_kind.get(k, 0.0) for k in KINDS},
        fraction_by_kind={
            k: by_kind.get(k, 0.0) / busy if busy else 0.0 for k in KINDS
        },
        top=[
            dict(
                kind=k, op=op, kernel=name, us=us, bytes=bytes_by_kernel[(k, op, name)]
            )
            for (k, op, name), us in by_kernel.most_common(15)
        ],
    )
    if nbytes:
        row["bytes_by_kind"] = {k: bytes_by_kind.get(k, 0.0) for k in KINDS}
        row["bytes_per_s_by_kind"] = {
            k: bytes_by_kind[k] / (by_kind[k] * 1e-6) for k in KINDS if by_kind[k]
        }
    return row
