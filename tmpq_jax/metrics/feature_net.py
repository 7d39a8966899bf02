"""The trained Fashion-MNIST classifier as a feature extractor for FID/KID/IS.

`load_feature_net(path)` restores the params written by `train_classifier`
(`<dir>/params`, orbax) and the architecture from `<dir>/card.json`, which also
records the image shape the net takes and the fingerprint of the data it was made
from (`check_model_data` refuses a diffusion model trained on other data). `FeatureNet`
is a pytree (params are leaves, config is static), so it can be passed straight
into `jax.jit`/`vmap`-ed functions such as the search's fitness:

    fit = jax.jit(lambda net, x: fid_from_features(net.features(x), mu, sigma))

`extract` is the host-side batched path for large arrays (validates its input).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import struct

from tmpq_jax.checkpoint import CHECKPOINTS_DIR
from tmpq_jax.data import model_data_fingerprint, to_model_range
from tmpq_jax.errors import UserError
from tmpq_jax.metrics.classifier import (
    IMAGE_SHAPE,
    Classifier,
    ClassifierConfig,
    abstract_params,
)

DEFAULT_FEATURE_NET = CHECKPOINTS_DIR / "fmnist_classifier"
PARAMS_DIR = "params"
CARD_FILE = "card.json"
TRAIN_HINT = "tmpq train-classifier --config configs/classifier.py --workdir {path}"


class Extracted(NamedTuple):
    features: np.ndarray  # [N, feature_dim] float32
    logits: np.ndarray  # [N, num_classes] float32


@struct.dataclass
class FeatureNet:
    params: Any
    config: ClassifierConfig = struct.field(pytree_node=False)
    path: str | None = struct.field(pytree_node=False, default=None)
    # The input shape it was trained on (tests build nets for smaller images).
    image_shape: tuple[int, int, int] = struct.field(
        pytree_node=False, default=IMAGE_SHAPE
    )
    # What the card says of the data it was made from (None: not recorded).
    data_fingerprint: str | None = struct.field(pytree_node=False, default=None)
    data_name: str | None = struct.field(pytree_node=False, default=None)
    # "labels" (a classifier: logits are class scores) or "contrastive".
    objective: str = struct.field(pytree_node=False, default="labels")

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "feature-net"

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def features_and_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [N, *image_shape] in [-1, 1] -> ([N, D], [N, C]). Jittable."""
        model = Classifier(self.config)
        return model.apply({"params": self.params}, images, features=True)

    def features(self, images: jax.Array) -> jax.Array:
        return self.features_and_logits(images)[0]

    def logits(self, images: jax.Array) -> jax.Array:
        return self.features_and_logits(images)[1]

    def extract(self, images, batch_size: int = 1000) -> Extracted:
        """Features and logits of a large array, in jitted fixed-size batches.

        `images`: uint8 [N, H, W(, C)] (mapped to [-1, 1]) or float in [-1, 1].
        The last batch is padded, so only one shape is ever compiled.
        """
        x = check_images(images, self.image_shape)
        n = x.shape[0]
        bs = max(1, min(int(batch_size), n))
        feats, logits = [], []
        for start in range(0, n, bs):
            chunk = x[start : start + bs]
            if chunk.shape[0] < bs:
                pad = np.zeros((bs - chunk.shape[0], *self.image_shape), np.float32)
                chunk = np.concatenate([chunk, pad])
            f, lg = _features_and_logits_jit(self, chunk)
            feats.append(f)
            logits.append(lg)
        f = np.asarray(jnp.concatenate(feats))[:n]
        lg = np.asarray(jnp.concatenate(logits))[:n]
        return Extracted(f.astype(np.float32), lg.astype(np.float32))

    def fingerprint(self) -> str:
        return params_fingerprint(self.params)


_features_and_logits_jit = jax.jit(lambda net, x: net.features_and_logits(x))


def check_images(images, shape: tuple[int, ...] = IMAGE_SHAPE) -> np.ndarray:
    """Host-side: [N, *shape] uint8 or finite float in about [-1, 1] -> float32."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != tuple(shape) or x.shape[0] == 0:
        raise UserError(
            f"images have shape {np.asarray(images).shape}; the feature net takes "
            f"a non-empty [N, {', '.join(map(str, shape))}] batch"
            + (" (Fashion-MNIST size)." if tuple(shape) == IMAGE_SHAPE else ".")
        )
    if x.dtype == np.uint8:
        return to_model_range(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"images have dtype {x.dtype}; pass uint8 or float in [-1, 1].")
    if not np.all(np.isfinite(x)):
        raise UserError(
            "images contain NaN/inf; the sampler diverged or its output was not "
            "clipped -- fix the sampler before computing metrics."
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < -2.0 or hi > 2.0:
        raise UserError(
            f"image values span [{lo:.3g}, {hi:.3g}]; the feature net expects [-1, 1] "
            "(pass uint8, or map with to_model_range / clip the sampler's output)."
        )
    return x.astype(np.float32, copy=False)


def params_fingerprint(params: Any) -> str:
    """Short sha256 of the parameter values: ties reference stats to one net."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]


def save_params(directory: str | os.PathLike, params: Any) -> None:
    """Writes `params` with orbax into `directory` (which must not exist)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(directory).resolve(), params)
        ckptr.wait_until_finished()


def restore_params(
    directory: str | os.PathLike, config: ClassifierConfig, image_shape=IMAGE_SHAPE
) -> Any:
    """Restores params saved by `save_params` onto the default device.

    The abstract target carries this process's device as sharding, so a
    checkpoint written on a GPU restores on a CPU-only host and vice versa.
    """
    # local: with several processes, devices()[0] belongs to process 0.
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        abstract_params(config, image_shape),
    )
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(directory).resolve(), target)


def _read_card(path: Path) -> dict:
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise UserError(
            f"{path}: no {CARD_FILE}, so not a feature-net checkpoint; retrain with "
            f"`{TRAIN_HINT.format(path=path)}`."
        )
    try:
        card = json.loads(card_path.read_text())
        model_cfg = card["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{card_path}: unreadable ({type(e).__name__}); the checkpoint is corrupt, "
            f"retrain with `{TRAIN_HINT.format(path=path)}`."
        ) from None
    if not isinstance(model_cfg, dict):
        raise UserError(f"{card_path}: config.model is not a mapping; retrain it.")
    return card


def load_feature_net(path: str | os.PathLike | None = None) -> FeatureNet:
    """Restores the classifier at `path` (default: the shipped DEFAULT_FEATURE_NET)."""
    path = Path(path) if path is not None else DEFAULT_FEATURE_NET
    if not path.is_dir():
        raise UserError(
            f"{path}: no feature net there; train one with "
            f"`{TRAIN_HINT.format(path=path)}` or pass the right --feature-net."
        )
    card = _read_card(path)
    try:
        config = ClassifierConfig.from_dict(card["config"]["model"])
        image_shape = tuple(int(d) for d in card.get("image_shape", IMAGE_SHAPE))
        if len(image_shape) != 3:
            raise ValueError(f"image_shape {image_shape} is not (H, W, C)")
    except (TypeError, ValueError) as e:
        raise UserError(
            f"{path / CARD_FILE}: bad classifier config ({e}); the card is corrupt."
        ) from None
    try:
        params = restore_params(path / PARAMS_DIR, config, image_shape)
    except Exception as e:  # orbax/tensorstore raise many types for bad files
        raise UserError(
            f"{path / PARAMS_DIR}: cannot restore the classifier params "
            f"({type(e).__name__}); the checkpoint is missing or corrupt, retrain with "
            f"`{TRAIN_HINT.format(path=path)}`."
        ) from None
    expected = card.get("params_fingerprint")
    if expected and params_fingerprint(params) != expected:
        raise UserError(
            f"{path}: params do not match the fingerprint in {CARD_FILE}; the files "
            "come from different runs -- retrain or restore the whole directory."
        )
    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    return FeatureNet(
        params=params,
        config=config,
        path=str(path),
        image_shape=image_shape,
        data_fingerprint=data.get("fingerprint"),
        data_name=data.get("name"),
        objective=str(card.get("objective", "labels")),
    )


def _shape_str(shape) -> str:
    return "x".join(map(str, shape))


def check_image_shape(net: FeatureNet, shape, what: str = "the model") -> None:
    """Refuses, in one line, a net made for another image shape than `shape`."""
    shape = tuple(int(d) for d in shape)
    if shape != tuple(net.image_shape):
        raise UserError(
            f"{what} makes {_shape_str(shape)} images but the feature net "
            f"{net.path} takes {_shape_str(net.image_shape)}; make a feature net "
            f"from {_shape_str(shape)} images of the model's data with `tmpq "
            "train-classifier` and use that one."
        )


def check_model_data(
    net: FeatureNet, model_card: dict, what: str = "the model"
) -> None:
    """Refuses, in one line, a feature net made from other data than the data the
    diffusion model's card names (nothing to check when either is unrecorded)."""
    want = model_data_fingerprint(model_card)
    have = net.data_fingerprint
    if want is None or have is None or want == have:
        return
    data = (model_card.get("config") or {}).get("data") or {}
    name = data.get("name") or model_card.get("data") or "its data"
    raise UserError(
        f"{what} was trained on {name} (data fingerprint {want}) but the feature "
        f"net {net.path} was made from {net.data_name or 'other data'} ({have}); "
        f"make a feature net from {name} with `tmpq train-classifier` and use that "
        "one."
    )
