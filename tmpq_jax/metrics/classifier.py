"""Small CNNs whose penultimate layer is a FID feature space.

No Inception weights can be had offline (DESIGN.md section 4), so the project trains
this classifier and computes "FID (FMNIST classifier features)" in its 128-d
penultimate layer. GroupNorm, not BatchNorm, so `apply` is stateless and the same
function serves training, evaluation and the jitted/vmapped search.

Two architectures (`arch`), so evaluation spaces can differ from the fitness's:
* `cnn`: two 3x3 convs a stage, 2x average-pool between, global mean (the
  shipped fitness net);
* `resnet`: a 5x5 stride-2 stem, then a 3x3 conv (strided after the first stage)
  and one residual block a stage,
  GELU, and global mean and max pooled features concatenated.
Any image size works (global pooling); only the channel count fixes the params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tmpq_jax.errors import UserError, check_keys

IMAGE_SHAPE = (28, 28, 1)
ARCHS = ("cnn", "resnet")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture: one stage per width (two 3x3 convs), 2x average-pool between."""

    widths: tuple[int, ...] = (48, 96, 192)
    feature_dim: int = 128
    num_classes: int = 10
    num_groups: int = 8
    arch: str = "cnn"  # cnn | resnet (see the module doc)

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.arch not in ARCHS:
            raise UserError(f"classifier arch {self.arch!r}: use one of {list(ARCHS)}.")
        if not self.widths or any(w <= 0 for w in self.widths):
            raise UserError(f"classifier widths must be positive, got {self.widths}.")
        for w in self.widths:
            if w % min(self.num_groups, w):
                raise UserError(
                    f"classifier width {w} is not divisible by num_groups "
                    f"{self.num_groups}; pick widths that are multiples of it."
                )
        if self.feature_dim <= 0 or self.num_classes <= 1:
            raise UserError("feature_dim must be > 0 and num_classes > 1.")
        pooled = self.widths[-1] * (2 if self.arch == "resnet" else 1)
        if self.feature_dim > pooled:
            raise UserError(
                f"feature_dim {self.feature_dim} exceeds the last width "
                f"{self.widths[-1]} ({pooled} pooled features): the features would "
                f"span only {pooled} dims (singular covariance); widen the last "
                "stage or shrink it."
            )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        check_keys(cls, d, "the classifier config")
        kw = dict(d)
        if "widths" in kw:
            kw["widths"] = tuple(kw["widths"])
        return cls(**kw)


class Classifier(nn.Module):
    """Images [N, H, W, C] in [-1, 1] -> logits, or (features, logits) with
    features=True.

    The features are the pre-activation output of the penultimate dense layer
    (`feature_dim` wide): unbounded and not rectified, so their covariance is full
    rank, which the FID's Gaussian fit wants.
    """

    config: ClassifierConfig

    @nn.compact
    def __call__(self, x: jax.Array, features: bool = False):
        cfg = self.config
        h = x.astype(jnp.float32)
        if cfg.arch == "resnet":
            h = self._resnet(h)
        else:
            for i, width in enumerate(cfg.widths):
                if i > 0:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
                for j in range(2):
                    h = nn.Conv(width, (3, 3), padding="SAME", name=f"conv{i}_{j}")(h)
                    h = nn.GroupNorm(
                        num_groups=min(cfg.num_groups, width), name=f"gn{i}_{j}"
                    )(h)
                    h = nn.silu(h)
            h = jnp.mean(h, axis=(1, 2))
        feats = nn.Dense(cfg.feature_dim, name="feature")(h)
        logits = nn.Dense(cfg.num_classes, name="head")(nn.silu(feats))
        return (feats, logits) if features else logits

    def _resnet(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        gn = lambda w, name: nn.GroupNorm(  # noqa: E731
            num_groups=min(cfg.num_groups, w), name=name
        )
        w0 = cfg.widths[0]
        h = nn.Conv(w0, (5, 5), (2, 2), name="stem")(h)  # half resolution at once
        h = nn.gelu(gn(w0, "stem_gn")(h))
        for i, width in enumerate(cfg.widths):
            stride = (2, 2) if i > 0 else (1, 1)
            h = nn.Conv(width, (3, 3), stride, name=f"down{i}")(h)
            r = nn.gelu(gn(width, f"gn{i}_a")(h))
            r = nn.Conv(width, (3, 3), name=f"res{i}_a")(r)
            r = nn.gelu(gn(width, f"gn{i}_b")(r))
            h = h + nn.Conv(width, (3, 3), name=f"res{i}_b")(r)
        h = nn.gelu(gn(cfg.widths[-1], "out_gn")(h))
        return jnp.concatenate([jnp.mean(h, (1, 2)), jnp.max(h, (1, 2))], -1)


def init_params(
    config: ClassifierConfig, key: jax.Array, image_shape=IMAGE_SHAPE
) -> Any:
    """Fresh parameters for `Classifier(config)` on images of `image_shape`."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return Classifier(config).init(key, dummy)["params"]


def abstract_params(config: ClassifierConfig, image_shape=IMAGE_SHAPE) -> Any:
    """Shape/dtype tree of the parameters, without computing them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), image_shape))


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
