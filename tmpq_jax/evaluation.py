"""Scoring a set of generated images: FID, KID, IS and the class histogram.

All in the feature space of the project's Fashion-MNIST classifier (no Inception
weights exist offline), so every figure is named for it: "FID (FMNIST classifier
features)". Compare only against the floor (real images at the same sample size).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from tmpq_jax.data import load_fmnist
from tmpq_jax.data.loaders import FMNIST_CLASSES
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.errors import UserError
from tmpq_jax.metrics import (
    REF_STATS_FILE,
    FeatureNet,
    class_histogram,
    fid,
    inception_score,
    kid,
    load_feature_net,
    load_reference_stats,
)
from tmpq_jax.sampling import LoadedModel, sample

FID_NAME = "FID (FMNIST classifier features)"


class Evaluator:
    """The feature net, its reference stats and the test-set features (for KID)."""

    def __init__(
        self, feature_net: str | Path | None = None, data_dir: str | None = None
    ):
        self.net: FeatureNet = load_feature_net(feature_net)
        self.stats = load_reference_stats(
            Path(self.net.path) / REF_STATS_FILE, self.net
        )
        self._data_dir = data_dir

    @classmethod
    def from_parts(cls, net: FeatureNet, stats: dict) -> Evaluator:
        """An Evaluator over an already loaded net and its reference statistics."""
        ev = cls.__new__(cls)
        ev.net, ev.stats, ev._data_dir = net, stats, None
        return ev

    @functools.cached_property
    def test_features(self) -> np.ndarray:
        if "features_test" in self.stats:  # stored with the stats: skips 10k forwards
            return self.stats["features_test"]
        return self.net.extract(load_fmnist("test", self._data_dir).images).features

    def check_num_samples(self, n: int) -> None:
        """Fails fast, before any sampling, on a count FID cannot use."""
        if n <= self.net.feature_dim:
            raise UserError(
                f"--num-samples {n}: FID needs more samples than the "
                f"{self.net.feature_dim} feature dims (covariance); use at least "
                f"{self.net.feature_dim + 1}, 2000 or more for stable figures."
            )

    def score(self, images: np.ndarray, key: jax.Array | None = None) -> dict:
        """images: uint8 [N, 28, 28, 1] or float in [-1, 1]."""
        ext = self.net.extract(images)
        n = ext.features.shape[0]
        k_mean, k_std = kid(
            ext.features,
            self.test_features,
            num_subsets=50,
            subset_size=min(1000, n),
            key=key if key is not None else jax.random.key(0),
        )
        hist = np.asarray(class_histogram(ext.logits))
        return {
            "num_samples": int(n),
            "fid": fid(
                ext.features,
                self.stats["mu_test"],
                self.stats["sigma_test"],
                self.stats.get("sqrt_sigma_test"),
            ),
            "kid": k_mean,
            "kid_std": k_std,
            "is": float(inception_score(ext.logits)),
            "class_histogram": {
                c: float(h) for c, h in zip(FMNIST_CLASSES, hist, strict=True)
            },
            "min_class_fraction": float(hist.min()),
        }


def evaluate_model(
    ev: Evaluator,
    lm: LoadedModel,
    steps: int,
    schedule: str,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 1000,
    progress: bool = False,
) -> dict:
    """Samples `num_samples` with DDIM (`schedule`) or DDPM ('ddpm') and scores them."""
    ev.check_num_samples(num_samples)
    T = lm.diffusion.num_timesteps
    ts = None if schedule == "ddpm" else timestep_schedule(schedule, steps, T)
    imgs = sample(jax.random.key(seed), lm, num_samples, ts, 0.0, batch_size, progress)
    row = {
        "sampler": "ddpm" if ts is None else "ddim",
        "steps": T if ts is None else int(steps),
        "schedule": schedule,
        "timesteps": None if ts is None else [int(t) for t in ts],
        "seed": seed,
    }
    return {**row, **ev.score(imgs)}


def format_report(r: dict) -> str:
    hist = "  ".join(f"{c}: {100 * f:.1f}%" for c, f in r["class_histogram"].items())
    return "\n".join(
        [
            f"{FID_NAME}: {r['fid']:.3f}   ({r['num_samples']} samples)",
            f"KID (FMNIST classifier features): {r['kid']:.5f} +- {r['kid_std']:.5f}",
            f"IS (FMNIST classifier): {r['is']:.3f}",
            f"class histogram: {hist}",
        ]
    )
