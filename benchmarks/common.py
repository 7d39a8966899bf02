"""Shared pieces of the benchmarks: provenance header, timing, atomic JSON output,
the quantized eps function and markdown tables."""

import json
import os
import shlex
import sys
import time
from pathlib import Path

import jax

from tmpq_jax import files
from tmpq_jax.provenance import provenance as _provenance
from tmpq_jax.quant.supernet import quantized_apply

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def provenance() -> dict:
    return _provenance(_command())


def load_result(name: str) -> dict | None:
    """benchmarks/results/<name> as a dict, or None where it was not measured."""
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def _command() -> str:
    parts = Path(sys.argv[0]).resolve().with_suffix("").parts
    if "benchmarks" in parts:  # show the `python -m` form that was meant
        i = len(parts) - 1 - parts[::-1].index("benchmarks")
        head = "python -m " + ".".join(parts[i:])
    else:
        head = f"python {shlex.quote(sys.argv[0])}"
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def time_fn(fn, *args, repeats: int = 3) -> float:
    """Best-of-`repeats` wall seconds of `fn(*args)` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def write_json(name: str, payload: dict, out_dir: str | os.PathLike | None = None):
    return files.write_json(Path(out_dir or RESULTS) / name, payload)


def add_args(ap, **defaults) -> None:
    """One `--name VALUE` flag per default (underscores as dashes), of its type."""
    for k, v in defaults.items():
        kind = str if v is None else type(v)
        ap.add_argument("--" + k.replace("_", "-"), type=kind, default=v)


def ints(spec: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]"""
    return [int(v) for v in spec.split(",")]


def quant_eps(model, params, bits, registry, qparams, candidates):
    """(x, t) -> eps of `model` with every registered layer quantized at `bits`."""
    kw = dict(bits=bits, registry=registry, qparams=qparams, candidates=candidates)
    return lambda x, t: quantized_apply(model, {"params": params}, x, t, **kw)


def md_table(head: list | str, rows: list) -> str:
    """A markdown table of a header ('a | b', or a list of cells) and rows of cells."""
    head = head.split(" | ") if isinstance(head, str) else head
    cell = lambda c: f" {c} |" if c != "" else " |"
    return "\n".join(
        "|" + "".join(map(cell, r)) for r in [head, ["---"] * len(head), *rows]
    )
