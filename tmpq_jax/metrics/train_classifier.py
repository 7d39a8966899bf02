"""Trains the Fashion-MNIST classifier that defines the FID feature space.

Whole dataset on device as uint8; `steps_per_call` steps per jitted call via
`lax.scan`; step `s` draws its batch (with replacement) and augmentation from
`fold_in(key, s)`, so a run is reproducible and independent of `steps_per_call`.
Augmentation: random horizontal flip and a random shift of up to `max_shift`
pixels (pad with background, crop). AdamW with warmup + cosine decay.

Output `<workdir>/`: `params/` (orbax), `card.json` (accuracy, config, device,
time, params fingerprint) and, unless disabled, `ref_stats.npz` + the FID floor.
Everything is written to a sibling temporary directory renamed at the end, so an
interrupted run leaves nothing half-written under `workdir`.
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

from tmpq_jax.data import load_fmnist
from tmpq_jax.errors import UserError, check_keys
from tmpq_jax.metrics.classifier import (
    IMAGE_SHAPE,
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

    def __post_init__(self):
        if min(self.batch_size, self.num_steps, self.steps_per_call) < 1:
            raise UserError("batch_size, num_steps and steps_per_call must be >= 1.")
        if self.max_shift < 0 or self.learning_rate <= 0:
            raise UserError("max_shift must be >= 0 and learning_rate > 0.")

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
    """uint8 [B, 28, 28, 1] -> float [-1, 1] with random flip and shift."""
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
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), IMAGE_SHAPE)
        x = jax.vmap(crop)(x, offs)
    return x


def _make_train_fn(cfg: ClassifierTrainConfig, tx: optax.GradientTransformation):
    model = Classifier(cfg.model)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        labels = optax.smooth_labels(
            jax.nn.one_hot(y, cfg.model.num_classes), cfg.label_smoothing
        )
        loss = optax.softmax_cross_entropy(logits, labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=(0, 1))
    def run(params, opt_state, step0, key, images, labels, length):
        def one(carry, i):
            params, opt_state = carry
            k_idx, k_aug = jax.random.split(jax.random.fold_in(key, step0 + i))
            idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
            x = augment(k_aug, images[idx], cfg.max_shift, cfg.hflip)
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, acc), grads = grad_fn(params, x, labels[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, acc)

        (params, opt_state), (loss, acc) = jax.lax.scan(
            one, (params, opt_state), jnp.arange(length)
        )
        return params, opt_state, jnp.mean(loss), jnp.mean(acc)

    return run


def _train_loop(cfg, images, labels, progress: bool):
    key_init, key_data = jax.random.split(jax.random.key(cfg.seed))
    params = init_params(cfg.model, key_init)
    tx = _make_optimizer(cfg)
    opt_state = tx.init(params)
    run = _make_train_fn(cfg, tx)
    images, labels = jax.device_put(images), jax.device_put(labels)
    history, step = [], 0
    with tqdm(total=cfg.num_steps, disable=not progress, desc="classifier") as bar:
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
    """Test accuracy and cross-entropy of `net` on uint8 images."""
    logits = net.extract(images, batch_size).logits
    labels = np.asarray(labels)
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    nll = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], 1)))
    acc = float(np.mean(np.argmax(logits, -1) == labels))
    return {"accuracy": acc, "loss": nll}


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


def _write_outputs(tmp, cfg, params, metrics, history, wall, data_dir) -> dict:
    save_params(tmp / PARAMS_DIR, params)
    card = {
        "what": "Fashion-MNIST classifier; its penultimate layer is the feature "
        "space of 'FID (FMNIST classifier features)' (not Inception FID)",
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "steps": cfg.num_steps,
        "final_train_loss": history[-1]["loss"],
        "num_params": count_params(params),
        "params_fingerprint": params_fingerprint(params),
        "config": cfg.to_dict(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "wall_time_s": round(wall, 2),
        "command": " ".join(["tmpq", *sys.argv[1:]]),
    }
    if cfg.reference_stats:
        net = FeatureNet(params=params, config=cfg.model, path=str(tmp))
        stats = compute_reference_stats(net, data_dir, out_path=tmp / REF_STATS_FILE)
        card["reference_stats"] = REF_STATS_FILE
        card["fid_floor_train_vs_test"] = fid_floor(
            net, stats, cfg.fid_floor_sizes, cfg.fid_floor_subsets, data_dir=data_dir
        )
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def train_classifier(
    cfg: ClassifierTrainConfig,
    workdir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Trains, evaluates on the test split and writes `workdir` (see module doc).

    Returns the card plus `loss_history` (one entry per jitted call) and `workdir`.
    """
    workdir = Path(workdir).resolve()
    train, test = load_fmnist("train", data_dir), load_fmnist("test", data_dir)
    n_tr = len(train) if cfg.train_subset is None else min(cfg.train_subset, len(train))
    n_te = len(test) if cfg.eval_subset is None else min(cfg.eval_subset, len(test))
    tmp = _prepare_workdir(workdir, overwrite)
    try:
        t0 = time.perf_counter()
        params, history = _train_loop(
            cfg, train.images[:n_tr], train.labels[:n_tr], progress
        )
        net = FeatureNet(params=params, config=cfg.model)
        metrics = evaluate(net, test.images[:n_te], test.labels[:n_te])
        wall = time.perf_counter() - t0
        card = _write_outputs(tmp, cfg, params, metrics, history, wall, data_dir)
        _commit(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**card, "loss_history": history, "workdir": str(workdir)}
