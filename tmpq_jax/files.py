"""Atomic file writes: a crash never leaves a half-written output behind.

In a multi-process JAX run every process computes the same outputs and only
process 0 writes them (one writer per file on a shared filesystem).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls `write(tmp_path)` on a sibling temp file, then renames it to `path`
    (process 0 only)."""
    path = Path(path)
    if jax.process_index() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    text = json.dumps(payload, indent=2) + "\n"
    return atomic_write(path, lambda p: Path(p).write_text(text))
