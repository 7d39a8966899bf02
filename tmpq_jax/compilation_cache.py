"""JAX's persistent compilation cache for the CLI's long compiles.

A search's generation programs take tens of seconds to compile on a GPU and about a
minute on a CPU. With the cache on, a resumed search, a rerun, and every other seed
of the same search (the seed is traced, so the programs are the same) load them
instead. `$JAX_COMPILATION_CACHE_DIR` (JAX's own setting) wins; `TMPQ_COMPILATION_CACHE`
names another directory, or `0` turns the cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_dir(env=os.environ) -> Path:
    base = env.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tmpq_jax" / "jax"


def enable(env=os.environ) -> Path | None:
    """Points JAX at the cache directory (before the first compile); returns it, or
    None when turned off or already chosen by the user."""
    choice = env.get("TMPQ_COMPILATION_CACHE", "")
    if choice == "0" or jax.config.jax_compilation_cache_dir:
        return None
    path = Path(choice) if choice else default_dir(env)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
