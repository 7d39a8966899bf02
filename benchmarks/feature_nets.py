"""Do our FID spaces separate real images from weak samples and from noise?

  python -m benchmarks.feature_nets [--digits-steps 400] [--out-dir DIR]

Nets: Fashion-MNIST's shipped ones (fitness, the ensemble's second, two evaluation
nets) and, on scikit-learn's 8x8 digits upsampled to 16x16, two trained here from an
`.npz` (with and without labels, as `tmpq train-classifier --data`). Each scores, on
the TRAIN split's statistics, held-out real images (`fid_real`), the same blurred by
sigma = height / 12 px (`fid_weak`: a weak generator's samples) and uniform noise
(`fid_noise`): 2000 images on Fashion-MNIST, the held-out 20% (360) of the digits.
Writes benchmarks/results/feature_nets.json. Needs scikit-learn.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import add_args, provenance, write_json
from tmpq_jax.checkpoint import CHECKPOINTS_DIR
from tmpq_jax.data import load_splits
from tmpq_jax.metrics import fid, load_feature_net, load_reference_stats
from tmpq_jax.metrics.train_classifier import ClassifierTrainConfig as TrainConfig
from tmpq_jax.metrics.train_classifier import default_configdict, train_classifier

FMNIST_NETS = ("fmnist_classifier", "fmnist_classifier_b", "fmnist_eval_resnet",
               "fmnist_eval_simclr")  # fmt: skip


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of uint8 [N, H, W, C] (edge-padded)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = images.astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        xp, n = np.pad(x, pad, mode="edge"), x.shape[axis]
        x = sum(
            k[i] * np.take(xp, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1)
        )
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def score_net(path: Path, dataset: str, real: np.ndarray, seed: int = 0) -> dict:
    net = load_feature_net(path)
    stats = load_reference_stats(path, net)
    card = json.loads((path / "card.json").read_text())
    ref = (stats["mu_train"], stats["sigma_train"], stats["sqrt_sigma_train"])
    noise = np.random.default_rng(seed).integers(0, 256, real.shape, dtype=np.uint8)
    labels = card.get("objective", "labels") == "labels"
    row = {
        "dataset": dataset, "feature_net": str(path.name),
        "objective": card.get("objective", "labels"),
        "arch": card["config"]["model"].get("arch", "cnn"),
        "feature_dim": net.feature_dim,
        "accuracy": card.get("test_accuracy", card.get("test_pair_accuracy")),
        "accuracy_kind": f"held-out {'classification' if labels else 'SimCLR pair'} accuracy",
        "knn_accuracy": card.get("test_knn_accuracy"),
        "train_device": card.get("device"), "train_wall_s": card.get("wall_time_s"),
        "num_samples": int(len(real)),
    }  # fmt: skip
    sets = {"real": real, "weak": blur(real, real.shape[1] / 12), "noise": noise}
    for name, images in sets.items():
        row[f"fid_{name}"] = fid(net.extract(images).features, *ref)
    return row


def digits_npz(root: Path) -> tuple[Path, Path]:
    """The digits as 16x16 uint8 .npz files, with and without labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images, np.ones((2, 2)))  # 8x8 -> 16x16, values 0..16
    x = np.clip(np.rint(x * 255.0 / 16.0), 0, 255).astype(np.uint8)
    labeled, unlabeled = root / "digits_labels.npz", root / "digits.npz"
    np.savez(labeled, images=x, labels=d.target.astype(np.int32))
    np.savez(unlabeled, images=x)
    return labeled, unlabeled


def digits_config(objective: str, steps: int) -> TrainConfig:
    c = default_configdict()
    c.model.update(widths=(16, 32), feature_dim=32, num_groups=8, arch="resnet")
    c.update(batch_size=128, num_steps=steps, steps_per_call=50, warmup_steps=50)
    c.update(learning_rate=3e-3, max_shift=1, objective=objective, test_fraction=0.2)
    c.update(hflip=False, fid_floor_sizes=(300,), fid_floor_subsets=4)  # no mirroring
    return TrainConfig.from_configdict(c)


def digits_rows(root: Path, steps: int) -> list[dict]:
    """Trains (or reuses, under `root`) the two digits nets and scores them."""
    root.mkdir(parents=True, exist_ok=True)
    labeled, unlabeled = digits_npz(root)
    rows = []
    for npz, objective in ((labeled, "labels"), (unlabeled, "contrastive")):
        cfg, wd = digits_config(objective, steps), root / f"digits_{objective}"
        if not (wd / "card.json").is_file():
            train_classifier(cfg, wd, progress=False, data=str(npz))
        splits = load_splits(str(npz), None, cfg.test_fraction, cfg.split_seed)
        rows.append(score_net(wd, "sklearn digits 16x16", splits.test.images))
        rows[-1]["data_file"] = npz.name
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, digits_steps=400, fmnist_samples=2000, out_dir=None)
    keep = "keep the digits nets in this directory (and reuse those already there)"
    ap.add_argument("--keep", help=keep)
    ap.add_argument("--datasets", default="fmnist,digits")
    args = ap.parse_args()
    rows, datasets = [], args.datasets.split(",")
    if "fmnist" in datasets:
        real = load_splits("fmnist").test.images[: args.fmnist_samples]
        for name in FMNIST_NETS:
            if (CHECKPOINTS_DIR / name / "card.json").is_file():
                rows.append(score_net(CHECKPOINTS_DIR / name, "fmnist", real))
                print(json.dumps(rows[-1]))
    if "digits" in datasets:
        with tempfile.TemporaryDirectory() as tmp:
            rows += digits_rows(Path(args.keep or tmp), args.digits_steps)
    what = ("FID (train-split statistics) of held-out real images, of the same images "
            "blurred (a weak model's samples) and of uniform noise, in each feature "
            "net's space")  # fmt: skip
    payload = {**provenance(), "what": what, "rows": rows}
    print(f"wrote {write_json('feature_nets.json', payload, args.out_dir)}")


if __name__ == "__main__":
    main()
