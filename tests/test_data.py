import gzip
import struct

import numpy as np
import pytest

from tmpq_jax.data import load_dataset, load_fmnist, load_npz, to_model_range
from tmpq_jax.errors import UserError


def _write_idx(path, arr, magic):
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs, 2051)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return tmp_path, imgs, labels


def test_idx_roundtrip(idx_dir):
    d, imgs, labels = idx_dir
    ds = load_fmnist("test", d)
    assert ds.images.shape == (5, 28, 28, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[..., 0], imgs)
    np.testing.assert_array_equal(ds.labels, labels)


def test_missing_file_names_apt_package(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_fmnist("train", tmp_path)


def test_wrong_magic(idx_dir):
    d, imgs, _ = idx_dir
    _write_idx(d / "train-images-idx3-ubyte.gz", imgs, 9999)
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: not an idx file"):
        load_fmnist("train", d)


def test_truncated(idx_dir):
    d, _, _ = idx_dir
    path = d / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(UserError, match="truncated"):
        load_fmnist("train", d)


def test_corrupt_gzip(idx_dir):
    d, _, _ = idx_dir
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match="unreadable"):
        load_fmnist("train", d)


def test_npz_formats(tmp_path):
    a = np.zeros((3, 8, 8), np.uint8)
    np.savez(tmp_path / "a.npz", images=a)
    assert load_npz(tmp_path / "a.npz").images.shape == (3, 8, 8, 1)
    np.savez(
        tmp_path / "b.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=[0, 1, 2]
    )
    ds = load_dataset(str(tmp_path / "b.npz"))
    assert ds.images.shape == (3, 8, 8, 3) and list(ds.labels) == [0, 1, 2]


@pytest.mark.parametrize(
    "content, match",
    [
        (dict(images=np.zeros((3, 8, 8), np.float32)), "must be uint8"),
        (dict(pixels=np.zeros((3, 8, 8), np.uint8)), "no `images` array"),
        (
            dict(images=np.zeros((3, 8, 8), np.uint8), labels=[1]),
            "3 images but 1 labels",
        ),
    ],
)
def test_npz_bad(tmp_path, content, match):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(UserError, match=match):
        load_npz(tmp_path / "bad.npz")


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_npz(tmp_path / "x.npz")


def test_model_range():
    x = to_model_range(np.array([0, 255], np.uint8))
    np.testing.assert_allclose(x, [-1.0, 1.0])


def test_real_fmnist_if_installed():
    # CI installs the apt package, so this reads the real files there.
    ds = load_fmnist("test")
    assert ds.images.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.labels).tolist() == [1000] * 10
