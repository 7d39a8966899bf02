"""Reference statistics of real images in a feature net's space (and in pixels).

`compute_reference_stats` fits (mu, sigma) to the features of the test and train
splits (Fashion-MNIST's 10k / 60k, or a user's data with a held-out test split,
`data.load_splits`) and saves them as one `.npz` beside the classifier
(`<feature net dir>/ref_stats.npz`), tagged with the classifier's params
fingerprint so stats from another net are refused. Covariances are accumulated in
float64 on the host (cheap, done once), together with their float64 square roots
(`sqrt_sigma_*`), which keep the float32 FID accurate; the jittable FID casts them
on use: `fid_from_features(f, s["mu_test"], s["sigma_test"], s["sqrt_sigma_test"])`.
The same file holds the pixel-space stats of both splits (`*_pixels_*`, see
`spaces.pixel_features`) and the data's fingerprint.

Which split serves what: anything a search optimizes or selects with reads the
`train` stats (`fitness_stats`); every reported figure reads the `test` stats.

`fid_floor` is the FID of real train subsets against the test stats: the value a
perfect generator would get at that sample size, i.e. the floor to read every
"FID (FMNIST classifier features)" against.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tmpq_jax.data import Splits, load_splits, to_model_range
from tmpq_jax.errors import UserError
from tmpq_jax.metrics.feature_net import FeatureNet
from tmpq_jax.metrics.fid import fid
from tmpq_jax.metrics.spaces import pixel_features

REF_STATS_FILE = "ref_stats.npz"
_LAST_TRAIN_FEATURES: dict = {}  # net fingerprint -> its train features (one entry)
_KEYS = ("mu_test", "sigma_test", "mu_train", "sigma_train")


def _stats64(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    mu = f.mean(axis=0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def sqrtm_psd64(sigma: np.ndarray) -> np.ndarray:
    """float64 PSD square root on the host (eigh, eigenvalues clipped at 0)."""
    s = np.asarray(sigma, np.float64)
    w, v = np.linalg.eigh(0.5 * (s + s.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def pixel_stats(splits: Splits, batch_size: int = 5000) -> dict:
    """`*_pixels_{test,train}` moments of the pooled pixels of both splits."""
    stats: dict = {}
    for split, ds in (("test", splits.test), ("train", splits.train)):
        feats = np.concatenate(
            [
                np.asarray(
                    pixel_features(to_model_range(ds.images[s : s + batch_size]))
                )
                for s in range(0, len(ds), batch_size)
            ]
        )
        mu, sigma = _stats64(feats)
        stats[f"mu_pixels_{split}"], stats[f"sigma_pixels_{split}"] = mu, sigma
        stats[f"sqrt_sigma_pixels_{split}"] = sqrtm_psd64(sigma)
    return stats


def compute_reference_stats(
    feature_net: FeatureNet,
    data_dir: str | os.PathLike | None = None,
    out_path: str | os.PathLike | None = None,
    batch_size: int = 1000,
    splits: Splits | None = None,
) -> dict:
    """Stats of the test and train splits of `splits` (default: Fashion-MNIST's,
    read from `data_dir`), in the net's features and in pixels; saved to
    `out_path` (default: beside the feature net, if it has a path). Returns the
    dict that was saved."""
    splits = splits if splits is not None else load_splits("fmnist", data_dir)
    stats: dict = {}
    _LAST_TRAIN_FEATURES.clear()
    for split, ds in (("test", splits.test), ("train", splits.train)):
        feats = feature_net.extract(ds.images, batch_size).features
        stats[f"mu_{split}"], stats[f"sigma_{split}"] = _stats64(feats)
        stats[f"sqrt_sigma_{split}"] = sqrtm_psd64(stats[f"sigma_{split}"])
        stats[f"n_{split}"] = np.int64(len(ds))
        if split == "test":  # kept whole: KID needs samples, not moments
            stats["features_test"] = feats.astype(np.float32)
        else:  # kept in memory only, for a `fid_floor` right after
            _LAST_TRAIN_FEATURES[feature_net.fingerprint()] = feats
    stats.update(pixel_stats(splits))
    stats["fingerprint"] = np.array(feature_net.fingerprint())
    stats["data_fingerprint"] = np.array(splits.fingerprint)
    if out_path is None and feature_net.path is not None:
        out_path = Path(feature_net.path) / REF_STATS_FILE
    if out_path is not None:
        save_reference_stats(out_path, stats)
    return stats


def save_reference_stats(path: str | os.PathLike, stats: dict) -> None:
    """Writes `stats` as `.npz` via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **stats)
    os.replace(tmp, path)


def load_reference_stats(
    path: str | os.PathLike, feature_net: FeatureNet | None = None
) -> dict:
    """Reads stats saved by `compute_reference_stats`; with `feature_net`, checks
    that they were computed with that net (same params fingerprint)."""
    path = Path(path)
    if path.is_dir():
        path = path / REF_STATS_FILE
    if not path.is_file():
        raise UserError(
            f"{path}: no reference stats; compute them with "
            "tmpq_jax.metrics.compute_reference_stats(load_feature_net(DIR))."
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except Exception as e:  # numpy raises several types for a bad zip
        raise UserError(f"{path}: not a readable .npz ({type(e).__name__}).") from None
    missing = [k for k in _KEYS if k not in stats]
    if missing:
        raise UserError(f"{path}: missing {missing}; recompute the reference stats.")
    for split in ("test", "train"):
        if f"sqrt_sigma_{split}" not in stats:
            stats[f"sqrt_sigma_{split}"] = sqrtm_psd64(stats[f"sigma_{split}"])
    if feature_net is not None and "fingerprint" in stats:
        if str(stats["fingerprint"]) != feature_net.fingerprint():
            raise UserError(
                f"{path}: computed with a different feature net than "
                f"{feature_net.path}; recompute them with compute_reference_stats."
            )
    return stats


def fitness_stats(stats: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The train-split moments a search may optimize or select with (never the
    test split's): {"mu", "sigma", "sqrt_sigma"} of `mu_{prefix}train` etc."""
    keys = {k: f"{k}_{prefix}train" for k in ("mu", "sigma", "sqrt_sigma")}
    missing = [v for v in keys.values() if v not in stats]
    if missing:
        raise UserError(
            f"reference stats lack {missing}: a search scores with the train split's "
            "statistics; recompute them with compute_reference_stats."
        )
    return {k: stats[v] for k, v in keys.items()}


def report_stats(stats: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The test-split moments every reported figure uses."""
    keys = {k: f"{k}_{prefix}test" for k in ("mu", "sigma", "sqrt_sigma")}
    missing = [v for v in keys.values() if v not in stats]
    if missing:
        raise UserError(
            f"reference stats lack {missing}; recompute them with "
            "compute_reference_stats."
        )
    return {k: stats[v] for k, v in keys.items()}


def fid_floor(
    feature_net: FeatureNet,
    stats: dict,
    subset_sizes: tuple[int, ...] = (2000, 10000),
    num_subsets: int = 5,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    splits: Splits | None = None,
) -> dict:
    """FID of `num_subsets` disjoint random train subsets of each size against the
    test stats. Returns {size: {"mean", "std", "values"}} (sizes as str keys)."""
    train = (splits if splits is not None else load_splits("fmnist", data_dir)).train
    too_big = [s for s in subset_sizes if s * num_subsets > len(train)]
    if too_big:
        raise UserError(
            f"subset sizes {too_big} x {num_subsets} subsets exceed the {len(train)} "
            "train images; use fewer or smaller subsets."
        )
    cached = _LAST_TRAIN_FEATURES.pop(feature_net.fingerprint(), None)
    if cached is not None and len(cached) == len(train):
        feats = cached
    else:
        feats = feature_net.extract(train.images).features
    perm = np.random.default_rng(seed).permutation(len(train))
    out = {}
    for size in subset_sizes:
        values = [
            fid(
                feats[perm[i * size : (i + 1) * size]],
                stats["mu_test"],
                stats["sigma_test"],
                stats.get("sqrt_sigma_test"),
            )
            for i in range(num_subsets)
        ]
        out[str(size)] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values)),
            "values": [float(v) for v in values],
        }
    return out
