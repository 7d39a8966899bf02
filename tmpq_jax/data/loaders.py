"""Loaders for Fashion-MNIST (the four standard idx `.gz` files) and generic `.npz`.

Images come back as uint8 `[N, H, W, C]`; `to_model_range` maps them to [-1, 1].
The model takes 28x28 natively (its levels are 28, 14, 7), so nothing is padded.
Every malformed input raises `UserError` naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
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
# `data_fingerprint` of the 60k Fashion-MNIST train images: the data a model
# whose card names 'fmnist' (and records no fingerprint) was trained on.
FMNIST_TRAIN_FINGERPRINT = "4cb47a6224067d8c"
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


def data_fingerprint(images: np.ndarray) -> str:
    """Short sha256 of a uint8 image array (its shape and bytes): names a data set,
    so a feature net and a diffusion model can be checked to share their data."""
    x = np.ascontiguousarray(np.asarray(images))
    if x.ndim == 3:
        x = x[..., None]
    h = hashlib.sha256()
    h.update(repr(tuple(x.shape)).encode())
    h.update(x.tobytes())
    return h.hexdigest()[:16]


def model_data_fingerprint(card: dict) -> str | None:
    """The fingerprint of the data a diffusion model's card says it was trained on:
    the recorded `data_fingerprint`, else Fashion-MNIST's for a card naming
    'fmnist', else None (unknown: nothing to check against)."""
    if not isinstance(card, dict):
        return None
    if card.get("data_fingerprint"):
        return str(card["data_fingerprint"])
    data = (card.get("config") or {}).get("data") or {}
    return FMNIST_TRAIN_FINGERPRINT if data.get("name") == "fmnist" else None


@dataclasses.dataclass(frozen=True)
class Splits:
    """A data set cut into the split models and fitness may see (`train`) and the
    one every reported figure uses (`test`)."""

    name: str
    fingerprint: str  # data_fingerprint of what a diffusion model trains on
    train: Dataset
    test: Dataset

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train.images.shape[1:])


def holdout(
    ds: Dataset, test_fraction: float = 0.1, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """(train, test): a fixed random `test_fraction` of `ds` held out (the same cut
    for the same data, fraction and seed)."""
    n = len(ds)
    n_test = int(round(test_fraction * n))
    if not 0.0 < test_fraction < 1.0 or n_test < 1 or n - n_test < 1:
        raise UserError(
            f"cannot hold out {test_fraction} of {n} images: use a fraction in (0, 1) "
            "leaving at least one image on each side."
        )
    perm = np.random.default_rng(seed).permutation(n)
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    pick = lambda idx: Dataset(  # noqa: E731
        ds.images[idx], None if ds.labels is None else ds.labels[idx]
    )
    return pick(tr), pick(te)


def load_splits(
    name: str = "fmnist",
    data_dir: str | os.PathLike | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Fashion-MNIST's own train/test split, or an `.npz` (all of it is what a
    diffusion model trains on) with `test_fraction` held out by `holdout`."""
    if name == "fmnist":
        train = load_fmnist("train", data_dir)
        test = load_fmnist("test", data_dir)
        return Splits("fmnist", data_fingerprint(train.images), train, test)
    ds = load_dataset(name, "train", data_dir)
    train, test = holdout(ds, test_fraction, seed)
    return Splits(str(name), data_fingerprint(ds.images), train, test)
