"""Feature nets for any data: `tmpq train-classifier --data FILE.npz` without
labels (SimCLR), the data fingerprint and image shape on the card, the one-line
refusals of a net made for other data or images, and the label-free spaces
(pooled pixels, k-NN precision/recall)."""

import json

import numpy as np
import pytest

from tmpq_jax.cli import main
from tmpq_jax.data import (
    FMNIST_TRAIN_FINGERPRINT,
    data_fingerprint,
    load_splits,
    model_data_fingerprint,
)
from tmpq_jax.diffusion.schedules import DiffusionConfig
from tmpq_jax.errors import UserError
from tmpq_jax.evaluation import Evaluator
from tmpq_jax.metrics import load_feature_net, load_reference_stats
from tmpq_jax.metrics.feature_net import check_image_shape, check_model_data
from tmpq_jax.metrics.spaces import pixel_features, precision_recall
from tmpq_jax.sampling import LoadedModel
from tmpq_jax.search.setup import load_net


@pytest.fixture(scope="module")
def blobs_npz(tmp_path_factory):
    """96 unlabeled 16x16 grayscale images, saved (N, H, W) as users may."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    cy, cx = rng.uniform(4, 12, (2, 96, 1, 1))
    r = rng.uniform(4, 12, (96, 1, 1))
    imgs = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r)).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, images=imgs)
    return path, imgs


@pytest.fixture(scope="module")
def simclr_net(blobs_npz, tmp_path_factory):
    path, _ = blobs_npz
    wd = tmp_path_factory.mktemp("nets") / "blobs_simclr"
    args = ["train-classifier", "--config", "configs/feature_net_cpu.py"]
    args += ["--data", str(path), "--workdir", str(wd), "--no-progress"]
    for kv in (
        "num_steps=2", "steps_per_call=2", "batch_size=16", "model.widths=(8,)",
        "model.feature_dim=8", "model.num_groups=4", "test_fraction=0.25",
        "fid_floor_sizes=(20,)", "fid_floor_subsets=2",
    ):  # fmt: skip
        args.append(f"--config.{kv}")
    assert main(args) == 0
    return wd


def test_holdout_is_fixed_and_fingerprint_names_the_data(blobs_npz):
    path, imgs = blobs_npz
    a, b = (
        load_splits(str(path), test_fraction=0.25),
        load_splits(str(path), None, 0.25),
    )
    assert len(a.test) == 24 and len(a.train) == 72 and a.image_shape == (16, 16, 1)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    assert a.fingerprint == data_fingerprint(imgs) == data_fingerprint(imgs[..., None])
    assert data_fingerprint(imgs[::-1]) != a.fingerprint
    # Old model cards name 'fmnist' without a fingerprint: Fashion-MNIST's.
    card = {"config": {"data": {"name": "fmnist"}}}
    assert model_data_fingerprint(card) == FMNIST_TRAIN_FINGERPRINT
    assert model_data_fingerprint({"data_fingerprint": "ab", **card}) == "ab"
    assert model_data_fingerprint({"config": {"data": {"name": "x.npz"}}}) is None


def test_label_free_net_card_and_stats(simclr_net, blobs_npz):
    _, imgs = blobs_npz
    card = json.loads((simclr_net / "card.json").read_text())
    assert card["objective"] == "contrastive" and card["image_shape"] == [16, 16, 1]
    assert card["data"]["fingerprint"] == data_fingerprint(imgs)
    assert card["data"]["n_test"] == 24 and 0.0 <= card["test_pair_accuracy"] <= 1.0
    net = load_feature_net(simclr_net)
    assert net.image_shape == (16, 16, 1) and net.objective == "contrastive"
    stats = load_reference_stats(simclr_net, net)
    for k in (
        "mu_train",
        "sigma_train",
        "mu_test",
        "mu_pixels_train",
        "mu_pixels_test",
    ):
        assert k in stats
    assert str(stats["data_fingerprint"]) == data_fingerprint(imgs)


def test_nets_for_other_data_or_images_are_refused(simclr_net, tiny_cfg, tiny_params):
    net = load_feature_net(simclr_net)
    for card in (
        {"data_fingerprint": "0123456789abcdef"},
        {"config": {"data": {"name": "fmnist"}}},
    ):
        with pytest.raises(UserError, match="train-classifier") as e:
            check_model_data(net, card)
        assert "\n" not in str(e.value)
    check_model_data(net, {"data_fingerprint": net.data_fingerprint})
    with pytest.raises(UserError, match="takes 16x16x1") as e:
        check_image_shape(net, (28, 28, 1))
    assert "\n" not in str(e.value)
    # The search and `tmpq eval` run the same checks on the model's card.
    lm = LoadedModel(
        tiny_cfg,
        DiffusionConfig(),
        tiny_params,
        {"config": {"data": {"name": "fmnist"}}},
    )
    with pytest.raises(UserError, match="was trained on fmnist"):
        load_net(simclr_net, lm, "fitness")
    with pytest.raises(UserError, match="was trained on fmnist"):
        Evaluator(simclr_net).check_model(lm)
    # An evaluation net that is the feature net itself is refused.
    with pytest.raises(UserError, match="evaluation net"):
        Evaluator(simclr_net, eval_nets=[simclr_net])


def test_pixel_space_and_precision_recall():
    rng = np.random.default_rng(0)
    assert pixel_features(np.zeros((2, 28, 28, 1))).shape == (2, 196)
    assert pixel_features(np.zeros((2, 16, 16, 1))).shape == (2, 256)
    assert pixel_features(np.zeros((2, 32, 32, 3))).shape[1] <= 256
    real = rng.normal(size=(400, 8))
    same = precision_recall(real, rng.normal(size=(400, 8)))
    far = precision_recall(real, rng.normal(size=(400, 8)) + 10.0)
    narrow = precision_recall(real, 0.1 * rng.normal(size=(400, 8)))
    assert same["precision"] > 0.7 and same["recall"] > 0.7
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    assert narrow["precision"] > 0.9 and narrow["recall"] < 0.2  # mode collapse
    with pytest.raises(UserError):
        precision_recall(real, rng.normal(size=(400, 7)))
