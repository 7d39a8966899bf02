"""Trains a feature net: the network whose penultimate layer is a FID space.

Data: Fashion-MNIST (its own train/test split) or any `.npz` of uint8 images
(N, H, W[, C]) with optional `labels`, of which a fixed `test_fraction` is held out
(`data.load_splits`). Two objectives (`objective`; `auto` picks `labels` when the
data has labels, else `contrastive`):

* `labels`: a classifier (cross-entropy); augmentation: random horizontal flip and
  a shift of up to `max_shift` pixels.
* `contrastive`: SimCLR (Chen et al. 2020): two random views of each image
  (resized crop, flip, brightness/contrast jitter, pixel noise) are pulled
  together and pushed from the rest of the batch by the NT-Xent loss at
  temperature `temperature`, through a projection head (the `head` layer,
  `projection_dim` wide); the features are the layer before it. Chosen over a
  denoising autoencoder because its features encode what survives the
  augmentations (shape and layout, not exact pixel values), which is what a FID
  space should compare, they differ in kind from the pixel-space statistics we
  report beside them, and a 0.2M-parameter net trains in minutes on a CPU.
  Its held-out objective is the pair accuracy: how often a test image's view finds
  its twin among 512 other views (nearest in the projection space).

Whole dataset on device as uint8; `steps_per_call` steps per jitted call via
`lax.scan`; step `s` draws its batch (with replacement) and augmentation from
`fold_in(key, s)`, so a run is reproducible and independent of `steps_per_call`.
AdamW with warmup + cosine decay.

Output `<workdir>/`: `params/` (orbax), `card.json` (held-out accuracy or
objective, config, image shape, the data's name and fingerprint, device, time,
params fingerprint) and, unless disabled, `ref_stats.npz` (train and test split
statistics) + the FID floor. Everything is written to a sibling temporary
directory renamed at the end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from tmpq_jax.data import Splits, load_splits
from tmpq_jax.errors import UserError, check_keys
from tmpq_jax.metrics.classifier import (
    Classifier,
    ClassifierConfig,
    count_params,
    init_params,
)
from tmpq_jax.metrics.feature_net import (
    CARD_FILE,
    PARAMS_DIR,
    FeatureNet,
    params_fingerprint,
    save_params,
)
from tmpq_jax.metrics.reference import (
    REF_STATS_FILE,
    compute_reference_stats,
    fid_floor,
)

OBJECTIVES = ("auto", "labels", "contrastive")
PAIR_EVAL = 512  # views per batch of the held-out pair accuracy


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    model: ClassifierConfig = ClassifierConfig()
    batch_size: int = 256
    num_steps: int = 7000  # ~30 epochs of 60k at batch 256
    steps_per_call: int = 100
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    label_smoothing: float = 0.0
    max_shift: int = 2
    hflip: bool = True
    seed: int = 0
    train_subset: int | None = None  # first N train images only (tests)
    eval_subset: int | None = None  # first N test images only (tests)
    reference_stats: bool = True  # also write ref_stats.npz and the FID floor
    fid_floor_sizes: tuple[int, ...] = (2000, 10000)
    fid_floor_subsets: int = 5
    objective: str = "auto"  # auto | labels | contrastive (see the module doc)
    temperature: float = 0.2  # contrastive only
    projection_dim: int = 64  # contrastive only: the head's width
    test_fraction: float = 0.1  # held out of an .npz (Fashion-MNIST has its own)
    split_seed: int = 0

    def __post_init__(self):
        if min(self.batch_size, self.num_steps, self.steps_per_call) < 1:
            raise UserError("batch_size, num_steps and steps_per_call must be >= 1.")
        if self.max_shift < 0 or self.learning_rate <= 0:
            raise UserError("max_shift must be >= 0 and learning_rate > 0.")
        if self.objective not in OBJECTIVES:
            raise UserError(
                f"objective {self.objective!r}: use one of {list(OBJECTIVES)}."
            )
        if self.temperature <= 0 or self.projection_dim < 2:
            raise UserError("temperature must be > 0 and projection_dim >= 2.")

    @classmethod
    def from_configdict(cls, cd: Any) -> ClassifierTrainConfig:
        """From an `ml_collections.ConfigDict` (or dict) like configs/classifier.py."""
        d = dict(cd.to_dict() if hasattr(cd, "to_dict") else cd)
        check_keys(cls, d, "the classifier training config")
        if "model" in d:
            d["model"] = ClassifierConfig.from_dict(dict(d["model"]))
        if "fid_floor_sizes" in d:
            d["fid_floor_sizes"] = tuple(int(s) for s in d["fid_floor_sizes"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}


def default_configdict():
    """Every setting at its dataclass default, as the ConfigDict a config file
    starts from (config files hold overrides only)."""
    import ml_collections

    d = ClassifierTrainConfig().to_dict()
    d["model"]["widths"] = tuple(d["model"]["widths"])
    d["fid_floor_sizes"] = tuple(d["fid_floor_sizes"])
    return ml_collections.ConfigDict(d)


def _make_optimizer(cfg: ClassifierTrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        min(cfg.warmup_steps, max(cfg.num_steps - 1, 1)),
        cfg.num_steps,
        end_value=cfg.learning_rate * 0.01,
    )
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)


def augment(key, images_u8, max_shift: int, hflip: bool) -> jax.Array:
    """uint8 [B, H, W, C] -> float [-1, 1] with random flip and shift."""
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0
    b = x.shape[0]
    k_flip, k_shift = jax.random.split(key)
    if hflip:
        flip = jax.random.bernoulli(k_flip, 0.5, (b,))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if max_shift:
        s = max_shift
        x = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
        offs = jax.random.randint(k_shift, (b, 2), 0, 2 * s + 1)
        shape = images_u8.shape[1:]
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), shape)  # noqa: E731
        x = jax.vmap(crop)(x, offs)
    return x


def contrastive_view(key, images_u8, hflip: bool) -> jax.Array:
    """uint8 [B, H, W, C] -> one random SimCLR view, float in [-1, 1]: a resized
    crop of 40-100% of the area, flip, brightness/contrast jitter, pixel noise."""
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0
    b, h, w, c = x.shape
    ks = jax.random.split(key, 7)
    side = jnp.sqrt(jax.random.uniform(ks[0], (b,), minval=0.4, maxval=1.0))
    off = jax.random.uniform(ks[1], (b, 2)) * (1.0 - side)[:, None]

    def crop(img, s, o):  # the box [o, o + s] of the unit square -> the whole image
        return jax.image.scale_and_translate(
            img,
            (h, w, c),
            (0, 1),
            jnp.stack([1.0 / s, 1.0 / s]),
            jnp.stack([-o[0] * h / s, -o[1] * w / s]),
            "linear",
            antialias=False,
        )

    x = jax.vmap(crop)(x, side, off)
    if hflip:
        flip = jax.random.bernoulli(ks[2], 0.5, (b,))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    contrast = jax.random.uniform(ks[3], (b, 1, 1, 1), minval=0.6, maxval=1.4)
    bright = jax.random.uniform(ks[4], (b, 1, 1, 1), minval=-0.3, maxval=0.3)
    x = (x - mean) * contrast + mean + bright
    sd = jax.random.uniform(ks[5], (b, 1, 1, 1), maxval=0.15)
    x = x + sd * jax.random.normal(ks[6], x.shape)
    return jnp.clip(x, -1.0, 1.0)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float):
    """SimCLR's loss for paired projections [B, P]; also the fraction of views
    whose nearest other view is their twin."""
    z = jnp.concatenate([z1, z2])
    z = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)
    n = z1.shape[0]
    sim = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
    sim = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)
    twin = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
    loss = optax.softmax_cross_entropy_with_integer_labels(sim, twin).mean()
    return loss, jnp.mean(jnp.argmax(sim, -1) == twin)


def resolve_objective(cfg: ClassifierTrainConfig, splits: Splits) -> str:
    has_labels = splits.train.labels is not None
    if cfg.objective == "auto":
        return "labels" if has_labels else "contrastive"
    if cfg.objective == "labels" and not has_labels:
        raise UserError(
            f"{splits.name}: objective 'labels' but the data has no `labels` array; "
            "use objective 'contrastive' (or 'auto')."
        )
    return cfg.objective


def _model_for(cfg: ClassifierTrainConfig, splits: Splits, objective: str):
    """The architecture, with the head sized for the labels or the projection."""
    if objective == "contrastive":
        width = cfg.projection_dim
    else:
        labels = np.concatenate([splits.train.labels, splits.test.labels])
        if labels.min() < 0:
            raise UserError(f"{splits.name}: labels must be >= 0.")
        width = max(int(labels.max()) + 1, 2)
    if width == cfg.model.num_classes:
        return cfg.model
    return dataclasses.replace(cfg.model, num_classes=width)


def _make_train_fn(
    cfg: ClassifierTrainConfig, model_cfg, objective, tx: optax.GradientTransformation
):
    model = Classifier(model_cfg)

    def label_loss(params, key, x_u8, y):
        x = augment(key, x_u8, cfg.max_shift, cfg.hflip)
        logits = model.apply({"params": params}, x)
        labels = optax.smooth_labels(
            jax.nn.one_hot(y, model_cfg.num_classes), cfg.label_smoothing
        )
        loss = optax.softmax_cross_entropy(logits, labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    def contrastive_loss(params, key, x_u8, y):
        k1, k2 = jax.random.split(key)
        views = jnp.concatenate(
            [contrastive_view(k, x_u8, cfg.hflip) for k in (k1, k2)]
        )
        z = model.apply({"params": params}, views)
        return nt_xent(z[: x_u8.shape[0]], z[x_u8.shape[0] :], cfg.temperature)

    loss_fn = contrastive_loss if objective == "contrastive" else label_loss

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=(0, 1))
    def run(params, opt_state, step0, key, images, labels, length):
        def one(carry, i):
            params, opt_state = carry
            k_idx, k_aug = jax.random.split(jax.random.fold_in(key, step0 + i))
            idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, acc), grads = grad_fn(params, k_aug, images[idx], labels[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, acc)

        (params, opt_state), (loss, acc) = jax.lax.scan(
            one, (params, opt_state), jnp.arange(length)
        )
        return params, opt_state, jnp.mean(loss), jnp.mean(acc)

    return run


def _train_loop(cfg, model_cfg, objective, images, labels, progress: bool):
    key_init, key_data = jax.random.split(jax.random.key(cfg.seed))
    params = init_params(model_cfg, key_init, images.shape[1:])
    tx = _make_optimizer(cfg)
    opt_state = tx.init(params)
    run = _make_train_fn(cfg, model_cfg, objective, tx)
    if labels is None:
        labels = np.zeros(len(images), np.int32)
    images, labels = jax.device_put(images), jax.device_put(labels)
    history, step = [], 0
    with tqdm(total=cfg.num_steps, disable=not progress, desc=objective) as bar:
        while step < cfg.num_steps:
            length = min(cfg.steps_per_call, cfg.num_steps - step)
            params, opt_state, loss, acc = run(
                params, opt_state, step, key_data, images, labels, length=length
            )
            step += length
            loss, acc = float(loss), float(acc)
            history.append({"step": step, "loss": loss, "train_acc": acc})
            bar.update(length)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
    return params, history


def evaluate(net: FeatureNet, images, labels, batch_size: int = 1000) -> dict:
    """Test accuracy and cross-entropy of a classifier `net` on uint8 images."""
    logits = net.extract(images, batch_size).logits
    labels = np.asarray(labels)
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    nll = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], 1)))
    acc = float(np.mean(np.argmax(logits, -1) == labels))
    return {"accuracy": acc, "loss": nll}


def pair_accuracy(net: FeatureNet, images, hflip: bool, seed: int = 0) -> dict:
    """The contrastive objective on held-out uint8 images: NT-Xent loss and the
    fraction of views whose nearest other view (in the projection space) is their
    twin, over batches of PAIR_EVAL images (at most 4 batches)."""
    images = np.asarray(images)
    bs = min(PAIR_EVAL, len(images))
    fn = jax.jit(
        lambda k, x: nt_xent(
            net.logits(contrastive_view(jax.random.fold_in(k, 0), x, hflip)),
            net.logits(contrastive_view(jax.random.fold_in(k, 1), x, hflip)),
            0.2,
        )
    )
    losses, accs = [], []
    for b in range(min(4, len(images) // bs)):
        loss, acc = fn(jax.random.key(seed + b), images[b * bs : (b + 1) * bs])
        losses.append(float(loss))
        accs.append(float(acc))
    return {"pair_accuracy": float(np.mean(accs)), "nt_xent": float(np.mean(losses))}


def knn_accuracy(net: FeatureNet, train, test, k: int = 10, max_train=10_000) -> float:
    """Test accuracy of a k-NN vote (cosine) in the net's features: how much class
    information a label-free feature space carries."""
    tr_f = net.extract(train.images[:max_train]).features
    te_f = net.extract(test.images).features
    norm = lambda f: f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)  # noqa: E731
    tr_f, te_f = norm(tr_f), norm(te_f)
    tr_y = np.asarray(train.labels[:max_train])
    k = min(k, len(tr_f))
    correct = 0
    for s in range(0, len(te_f), 1000):
        sim = te_f[s : s + 1000] @ tr_f.T
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = tr_y[nn_idx]
        pred = np.array([np.bincount(v).argmax() for v in votes])
        correct += int(np.sum(pred == test.labels[s : s + 1000]))
    return correct / len(te_f)


def _prepare_workdir(workdir: Path, overwrite: bool) -> Path:
    if workdir.exists() and any(workdir.iterdir()) and not overwrite:
        raise UserError(
            f"{workdir}: exists and is not empty; remove it, pick another --workdir "
            "or pass overwrite."
        )
    workdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = workdir.with_name(f".{workdir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, workdir: Path) -> None:
    """Moves the finished `tmp` to `workdir`, replacing what was there."""
    old = workdir.with_name(f".{workdir.name}.old-{os.getpid()}")
    if workdir.exists():
        os.replace(workdir, old)
    os.replace(tmp, workdir)
    shutil.rmtree(old, ignore_errors=True)


def _floor_sizes(cfg, n_train: int, feature_dim: int) -> tuple[int, ...]:
    """The configured floor sizes that fit the train split (else the largest that
    does), above the feature dims."""
    k = cfg.fid_floor_subsets
    sizes = [s for s in cfg.fid_floor_sizes if s * k <= n_train]
    if not sizes:
        sizes = [n_train // k]
    return tuple(s for s in sizes if s > feature_dim)


def _write_outputs(
    tmp, cfg, model_cfg, objective, params, metrics, history, wall, splits
) -> dict:
    save_params(tmp / PARAMS_DIR, params)
    shape = list(splits.image_shape)
    fmnist = splits.name == "fmnist"
    arch = model_cfg.arch
    what = (
        f"Fashion-MNIST classifier ({arch}); its penultimate layer is a FID feature "
        "space (not Inception FID)"
        if fmnist and objective == "labels"
        else f"{objective} feature net ({arch}) of {splits.name}; its penultimate "
        "layer is a FID feature space (not Inception FID)"
    )
    card = {
        "what": what,
        "objective": objective,
        **{f"test_{k}": v for k, v in metrics.items()},
        "steps": cfg.num_steps,
        "final_train_loss": history[-1]["loss"],
        "num_params": count_params(params),
        "params_fingerprint": params_fingerprint(params),
        "image_shape": shape,
        "data": {
            "name": splits.name,
            "fingerprint": splits.fingerprint,
            "n_train": len(splits.train),
            "n_test": len(splits.test),
            "split": "fmnist train/test"
            if fmnist
            else f"{cfg.test_fraction} held out, seed {cfg.split_seed}",
        },
        "config": {**cfg.to_dict(), "model": model_cfg.to_dict()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "wall_time_s": round(wall, 2),
        "command": " ".join(["tmpq", *sys.argv[1:]]),
    }
    if cfg.reference_stats:
        net = FeatureNet(
            params=params, config=model_cfg, path=str(tmp), image_shape=tuple(shape)
        )
        stats = compute_reference_stats(
            net, out_path=tmp / REF_STATS_FILE, splits=splits
        )
        card["reference_stats"] = REF_STATS_FILE
        sizes = _floor_sizes(cfg, len(splits.train), model_cfg.feature_dim)
        card["fid_floor_train_vs_test"] = fid_floor(
            net, stats, sizes, cfg.fid_floor_subsets, splits=splits
        )
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def _subset(ds, n):
    from tmpq_jax.data import Dataset

    n = len(ds) if n is None else min(n, len(ds))
    return Dataset(ds.images[:n], None if ds.labels is None else ds.labels[:n])


def train_classifier(
    cfg: ClassifierTrainConfig,
    workdir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    data: str = "fmnist",
) -> dict:
    """Trains on `data` ('fmnist' or an .npz path), evaluates on its test split and
    writes `workdir` (see module doc).

    Returns the card plus `loss_history` (one entry per jitted call) and `workdir`.
    """
    workdir = Path(workdir).resolve()
    full = load_splits(data, data_dir, cfg.test_fraction, cfg.split_seed)
    objective = resolve_objective(cfg, full)
    model_cfg = _model_for(cfg, full, objective)
    # The subsets (tests) limit training and its evaluation; the statistics and
    # the floor always use the whole splits.
    train = _subset(full.train, cfg.train_subset)
    test = _subset(full.test, cfg.eval_subset)
    if len(full.test) <= model_cfg.feature_dim:
        raise UserError(
            f"{full.name}: {len(full.test)} held-out images, too few for the "
            f"{model_cfg.feature_dim} feature dims; hold out more (test_fraction) "
            "or shrink feature_dim."
        )
    tmp = _prepare_workdir(workdir, overwrite)
    try:
        t0 = time.perf_counter()
        params, history = _train_loop(
            cfg, model_cfg, objective, train.images, train.labels, progress
        )
        shape = full.image_shape
        net = FeatureNet(params=params, config=model_cfg, image_shape=shape)
        if objective == "labels":
            metrics = evaluate(net, test.images, test.labels)
        else:
            metrics = pair_accuracy(net, test.images, cfg.hflip)
            if test.labels is not None:
                metrics["knn_accuracy"] = knn_accuracy(net, train, test)
        wall = time.perf_counter() - t0
        card = _write_outputs(
            tmp, cfg, model_cfg, objective, params, metrics, history, wall, full
        )
        _commit(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**card, "loss_history": history, "workdir": str(workdir)}
