"""Image grids as PNG and sample sets as .npz, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from tmpq_jax.errors import UserError
from tmpq_jax.files import atomic_write


def make_grid(
    images_u8: np.ndarray, nrow: int | None = None, pad: int = 2
) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
    n, h, w, c = images_u8.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images_u8[i]
    return grid


def save_grid(
    images_u8: np.ndarray,
    path: str | os.PathLike,
    nrow: int | None = None,
    scale: int = 2,
) -> Path:
    if not str(path).lower().endswith(".png"):
        raise UserError(
            f"{path}: the grid is written as PNG; give a path ending in .png."
        )
    grid = make_grid(images_u8, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(Path(path), lambda p: img.save(p, format="PNG"))


def save_npz(images_u8: np.ndarray, path: str | os.PathLike, **extra) -> Path:
    if not str(path).endswith(".npz"):
        raise UserError(f"{path}: give a path ending in .npz.")
    return atomic_write(
        Path(path), lambda p: np.savez_compressed(p, images=images_u8, **extra)
    )
