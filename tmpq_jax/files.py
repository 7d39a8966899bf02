"""Atomic file writes: a crash never leaves a half-written output behind.

In a multi-process JAX run every process computes the same outputs and only
process 0 writes them (one writer per file on a shared filesystem). Files get the
usual permissions (0o666 less the umask, what `open` gives), not the temp file's
owner-only 0o600.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it
    (/proc/self/status; a file created meanwhile by another thread is then never
    made under a wrong umask), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """What `open` (0o666) or `mkdir` (0o777) would give under the umask."""
    return (0o777 if directory else 0o666) & ~umask()


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
        os.chmod(tmp, default_mode())  # mkstemp makes it 0o600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    text = json.dumps(payload, indent=2) + "\n"
    return atomic_write(path, lambda p: Path(p).write_text(text))
