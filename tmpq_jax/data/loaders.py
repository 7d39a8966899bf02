"""Loaders for Fashion-MNIST (the four standard idx `.gz` files) and generic `.npz`.

Images come back as uint8 `[N, H, W, C]`; `to_model_range` maps them to [-1, 1].
The model takes 28x28 natively (its levels are 28, 14, 7), so nothing is padded.
Every malformed input raises `UserError` naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path

import numpy as np

from tmpq_jax.errors import UserError

APT_PACKAGE = "dataset-fashion-mnist"
# Where Debian's dataset-fashion-mnist installs the idx files (`dpkg -L` shows it).
DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # [N, H, W, C] uint8
    labels: np.ndarray | None  # [N] int32, or None when the source has none

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _missing(path: Path) -> UserError:
    return UserError(
        f"{path}: not found. Install the data with `apt-get install {APT_PACKAGE}` "
        "or pass --data-dir DIR holding the four Fashion-MNIST idx .gz files."
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Reads one idx file (gzip or raw), checking magic number and length."""
    if not path.is_file():
        raise _missing(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(
            f"{path}: unreadable ({e}); reinstall with "
            f"`apt-get install --reinstall {APT_PACKAGE}`."
        ) from None
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise UserError(
            f"{path}: not an idx file (wrong magic number); expected the standard "
            f"Fashion-MNIST file from `apt-get install {APT_PACKAGE}`."
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise UserError(
            f"{path}: truncated ({len(raw) - header} of {expected} data bytes); "
            f"reinstall with `apt-get install --reinstall {APT_PACKAGE}`."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_fmnist(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> Dataset:
    """Fashion-MNIST `split` ('train' or 'test') as uint8 [N, 28, 28, 1] + labels."""
    if split not in _FILES:
        raise UserError(f"unknown split {split!r}; use one of {sorted(_FILES)}.")
    root = Path(data_dir) if data_dir is not None else DEFAULT_FMNIST_DIR
    img_name, lbl_name = _FILES[split]
    images = _read_idx(root / img_name, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(root / lbl_name, _IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise UserError(
            f"{root}: {len(images)} images but {len(labels)} labels; "
            "the idx files come from different releases."
        )
    return Dataset(images[..., None].copy(), labels.astype(np.int32))


def load_npz(path: str | os.PathLike) -> Dataset:
    """A user's `.npz` with uint8 `images` (N,H,W) or (N,H,W,C), optional `labels`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; pass an .npz holding an `images` array.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # numpy raises several types for a bad zip
        raise UserError(f"{path}: not a readable .npz ({type(e).__name__}).") from None
    key = "images" if "images" in arrays else ("x" if "x" in arrays else None)
    if key is None:
        raise UserError(
            f"{path}: no `images` array (found {sorted(arrays)}); save with "
            "np.savez(path, images=uint8_array)."
        )
    images = arrays[key]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(
            f"{path}: `{key}` must be uint8 of shape (N,H,W) or (N,H,W,C), "
            f"got {images.dtype} {images.shape}."
        )
    if images.ndim == 3:
        images = images[..., None]
    labels = arrays.get("labels", arrays.get("y"))
    if labels is not None:
        labels = np.asarray(labels).astype(np.int32).reshape(-1)
        if len(labels) != len(images):
            raise UserError(f"{path}: {len(images)} images but {len(labels)} labels.")
    return Dataset(images, labels)


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> Dataset:
    """'fmnist' (idx files in `data_dir`) or a path to an `.npz`."""
    if name == "fmnist":
        return load_fmnist(split, data_dir)
    if str(name).endswith(".npz"):
        return load_npz(name)
    raise UserError(
        f"unknown dataset {name!r}; use 'fmnist' or a path to an .npz file."
    )


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0
