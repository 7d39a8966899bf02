"""Scoring a set of generated images against the TEST split: FID, KID, IS, the
class histogram, and the evaluation spaces a search never sees.

All in feature spaces the project trained (no Inception weights exist offline),
so every figure is named for its space: "FID (FMNIST classifier features)" is the
shipped classifier's -- the space the search's `fid` fitness optimizes, so a
searched genome's figure there can be gamed. Beside it, independent yardsticks:

* `fid_eval_<name>`: FID in each evaluation net's space (other architectures, one
  trained without labels; checkpoints/fmnist_eval_*), never given to a fitness;
* `fid_pixels`: FID of pooled pixels (`metrics.spaces.pixel_features`);
* `precision`, `recall`: k-NN precision and recall (Kynkaenniemi et al. 2019) in
  the first evaluation net's space (else the feature net's).

Every figure here reads the test split's statistics only; what a search optimizes
or selects with reads the train split's (`search/setup.py`). Compare only against
the floor (real images at the same sample size).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from tmpq_jax.checkpoint import CHECKPOINTS_DIR
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
from tmpq_jax.metrics.feature_net import (
    check_image_shape,
    check_images,
    check_model_data,
)
from tmpq_jax.metrics.reference import report_stats
from tmpq_jax.metrics.spaces import pixel_features, precision_recall
from tmpq_jax.sampling import LoadedModel, sample

FID_NAME = "FID (FMNIST classifier features)"
# What a search's fitness values are (the archive's `fid`, `fid_search`, the plots).
FITNESS_NAMES = {
    "fid": FID_NAME,
    "teacher": "teacher distance (to the full-precision model's samples; 0 = equal)",
    "ensemble": "ensemble FID (the fitness nets' mean, in the first net's units)",
}
PR_MAX = 5000  # precision/recall on at most this many samples per set
# The shipped evaluation nets (configs/eval_nets.py): never given to a fitness.
SHIPPED_EVAL_NETS = (
    CHECKPOINTS_DIR / "fmnist_eval_resnet",
    CHECKPOINTS_DIR / "fmnist_eval_simclr",
)


def default_eval_nets(lm: LoadedModel | None = None) -> tuple[str, ...]:
    """The shipped evaluation nets that exist and, given a model, were made from
    its data and images (else none: make your own with `tmpq train-classifier`)."""
    out = []
    for path in SHIPPED_EVAL_NETS:
        if not (path / "card.json").is_file():
            continue
        if lm is not None:
            try:
                net = load_feature_net(path)
                c = lm.config
                check_image_shape(net, (c.image_size, c.image_size, c.channels))
                check_model_data(net, lm.card)
            except UserError:
                continue
        out.append(str(path))
    return tuple(out)


def space_name(net: FeatureNet) -> str:
    """An evaluation net's short name: its directory's, after any `_eval_`."""
    name = net.name
    return name.split("_eval_", 1)[1] if "_eval_" in name else name


def _fid_test(features, stats: dict, prefix: str = "") -> float:
    ref = report_stats(stats, prefix)
    return fid(features, ref["mu"], ref["sigma"], ref["sqrt_sigma"])


class Evaluator:
    """The feature net, its reference stats and the test-set features (for KID),
    plus the evaluation nets (each with its stats)."""

    def __init__(
        self,
        feature_net: str | Path | None = None,
        data_dir: str | None = None,
        eval_nets: Sequence[str | Path] = (),
    ):
        self.net: FeatureNet = load_feature_net(feature_net)
        self.stats = load_reference_stats(
            Path(self.net.path) / REF_STATS_FILE, self.net
        )
        self._data_dir = data_dir
        nets = []
        for path in eval_nets:
            net = load_feature_net(path)
            nets.append(
                (net, load_reference_stats(Path(net.path) / REF_STATS_FILE, net))
            )
        self.eval_nets = self._checked(nets)

    @classmethod
    def from_parts(
        cls, net: FeatureNet, stats: dict, eval_nets: Sequence = ()
    ) -> Evaluator:
        """An Evaluator over an already loaded net and its reference statistics
        (`eval_nets`: (net, stats) pairs)."""
        ev = cls.__new__(cls)
        ev.net, ev.stats, ev._data_dir = net, stats, None
        ev.eval_nets = ev._checked(eval_nets)
        return ev

    def _checked(self, eval_nets) -> tuple:
        eval_nets = tuple(eval_nets)
        seen = {self.net.fingerprint(): self.net}
        for net, _ in eval_nets:
            fp = net.fingerprint()
            if fp in seen:
                raise UserError(
                    f"the evaluation net {net.path} is the same net as "
                    f"{seen[fp].path}: an evaluation space must differ from the "
                    "feature net (the fitness's space); pick another."
                )
            seen[fp] = net
            if tuple(net.image_shape) != tuple(self.net.image_shape):
                raise UserError(
                    f"the evaluation net {net.path} takes "
                    f"{'x'.join(map(str, net.image_shape))} images, the feature net "
                    f"{'x'.join(map(str, self.net.image_shape))}; use nets of one "
                    "image shape."
                )
        names = [space_name(n) for n, _ in eval_nets]
        if len(set(names)) != len(names):
            raise UserError(f"evaluation nets share a name {names}; rename a folder.")
        return eval_nets

    def check_model(self, lm: LoadedModel) -> None:
        """Refuses (one line) nets made for other images or data than the model's."""
        c = lm.config
        for net in (self.net, *(n for n, _ in self.eval_nets)):
            check_image_shape(net, (c.image_size, c.image_size, c.channels))
            check_model_data(net, lm.card)

    @functools.cached_property
    def test_features(self) -> np.ndarray:
        if "features_test" in self.stats:  # stored with the stats: skips 10k forwards
            return self.stats["features_test"]
        return self.net.extract(load_fmnist("test", self._data_dir).images).features

    def check_num_samples(self, n: int) -> None:
        """Fails fast, before any sampling, on a count FID cannot use."""
        dims = [self.net.feature_dim, *(n.feature_dim for n, _ in self.eval_nets)]
        if n <= max(dims):
            raise UserError(
                f"{n} samples: FID needs more samples than the {max(dims)} feature "
                f"dims (covariance); use at least {max(dims) + 1}, 2000 or more for "
                "stable figures."
            )

    def score(self, images: np.ndarray, key: jax.Array | None = None) -> dict:
        """images: uint8 [N, H, W, C] or float in [-1, 1]. Test split only."""
        x = check_images(images, self.net.image_shape)
        ext = self.net.extract(x)
        n = ext.features.shape[0]
        k_mean, k_std = kid(
            ext.features,
            self.test_features,
            num_subsets=50,
            subset_size=min(1000, n),
            key=key if key is not None else jax.random.key(0),
        )
        out = {
            "num_samples": int(n),
            "fid": _fid_test(ext.features, self.stats),
            "kid": k_mean,
            "kid_std": k_std,
        }
        if self.net.objective == "labels":
            hist = np.asarray(class_histogram(ext.logits, ext.logits.shape[1]))
            names = (
                FMNIST_CLASSES
                if len(hist) == len(FMNIST_CLASSES)
                else [str(i) for i in range(len(hist))]
            )
            out["is"] = float(inception_score(ext.logits))
            out["class_histogram"] = {
                c: float(h) for c, h in zip(names, hist, strict=True)
            }
            out["min_class_fraction"] = float(hist.min())
        out.update(self.independent_scores(x))
        return out

    def independent_scores(self, x: np.ndarray) -> dict:
        """The figures in spaces a search never sees (test split only)."""
        out, pr_feats = {}, None
        for net, stats in self.eval_nets:
            feats = net.extract(x).features
            out[f"fid_eval_{space_name(net)}"] = _fid_test(feats, stats)
            if pr_feats is None:
                pr_feats, pr_real, pr_space = feats, stats["features_test"], net
        pixel_dims = np.asarray(self.stats.get("mu_pixels_test", [])).shape[0]
        if 0 < pixel_dims < len(x):  # else too few samples for a pixel covariance
            pix = np.concatenate(
                [
                    np.asarray(pixel_features(x[s : s + 2000]))
                    for s in range(0, len(x), 2000)
                ]
            )
            out["fid_pixels"] = _fid_test(pix, self.stats, "pixels_")
        if pr_feats is None:
            pr_feats, pr_space = self.net.extract(x).features, self.net
            pr_real = self.test_features
        m = min(len(pr_feats), len(pr_real), PR_MAX)
        rng = np.random.default_rng(0)
        real = pr_real[rng.permutation(len(pr_real))[:m]]
        pr = precision_recall(real, pr_feats[:m])
        out.update(
            precision=pr["precision"],
            recall=pr["recall"],
            precision_recall_space=space_name(pr_space),
        )
        return out


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
    ev.check_model(lm)
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
    lines = [
        f"{FID_NAME}: {r['fid']:.3f}   ({r['num_samples']} samples, test split)",
        f"KID (FMNIST classifier features): {r['kid']:.5f} +- {r['kid_std']:.5f}",
    ]
    if "is" in r:
        lines.append(f"IS (FMNIST classifier): {r['is']:.3f}")
    for k in sorted(r):
        if k.startswith("fid_eval_"):
            lines.append(f"FID ({k[len('fid_eval_') :]} evaluation net): {r[k]:.3f}")
    if "fid_pixels" in r:
        lines.append(f"FID (pooled pixels): {r['fid_pixels']:.3f}")
    if "precision" in r:
        lines.append(
            f"precision {r['precision']:.3f}, recall {r['recall']:.3f} "
            f"(k-NN, {r['precision_recall_space']} features)"
        )
    if "class_histogram" in r:
        hist = "  ".join(
            f"{c}: {100 * f:.1f}%" for c, f in r["class_histogram"].items()
        )
        lines.append(f"class histogram: {hist}")
    return "\n".join(lines)
