"""Tests for tmpq_jax.metrics: FID/KID/IS numerics, input checks, and a tiny
classifier training run whose checkpoint, reference stats and loader round-trip.

CPU-only and fast: the classifier is one 8-channel stage trained for 32 steps on
512 images, with a small Fashion-MNIST copy (1000 train / 500 test) as data_dir.
"""

import gzip
import importlib.util
import json
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from tmpq_jax.data import load_fmnist
from tmpq_jax.errors import UserError
from tmpq_jax.metrics import (
    ClassifierConfig,
    ClassifierTrainConfig,
    FeatureNet,
    check_features,
    class_histogram,
    compute_reference_stats,
    fid,
    fid_floor,
    fid_from_features,
    fid_from_stats,
    gaussian_stats,
    inception_score,
    kid,
    load_feature_net,
    load_reference_stats,
    train_classifier,
)
from tmpq_jax.metrics.reference import sqrtm_psd64

D, N = 128, 2000
REPO = Path(__file__).resolve().parents[1]


def _random_cov(seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(D, D)) / np.sqrt(D)
    return a @ a.T + 0.1 * np.eye(D)


@pytest.fixture(scope="module")
def samples():
    """Three 2000x128 sample sets: x1 and x3 from one correlated Gaussian, x2 from
    another with a shifted mean."""
    rng = np.random.default_rng(0)
    c1, c2 = _random_cov(1), _random_cov(2)
    x1 = rng.multivariate_normal(np.zeros(D), c1, N)
    x2 = rng.multivariate_normal(np.full(D, 0.1), c2, N)
    x3 = rng.multivariate_normal(np.zeros(D), c1, N)
    return x1, x2, x3


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """float64 reference FID and the covariance trace scale tr(S1) + tr(S2)."""
    m1, s1 = a.mean(0), np.cov(a, rowvar=False)
    m2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    value = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    return float(value), float(np.trace(s1) + np.trace(s2))


_fid_jit = jax.jit(fid_from_features)


def _ours(a, b) -> float:
    mu, sigma = gaussian_stats(jnp.asarray(b, jnp.float32))
    return float(_fid_jit(jnp.asarray(a, jnp.float32), mu, sigma))


@pytest.mark.parametrize("case", ["different", "same_distribution", "near_identical"])
def test_fid_matches_scipy(samples, case):
    x1, x2, x3 = samples
    other = {
        "different": x2,
        "same_distribution": x3,
        "near_identical": x1 + 0.05 * np.random.default_rng(5).normal(size=x1.shape),
    }[case]
    ref, scale = _scipy_fid(x1, other)
    # FID = tr(S1) + tr(S2) - 2 tr(covmean) + ...: float32 cancellation leaves an
    # absolute error of order 1e-7 * scale (~3e-5 here). For the near-identical
    # pair (FID ~1e-2) that term dominates, so the bound is 1e-3 relative plus
    # 1e-6 of the trace scale (~3e-4 absolute).
    assert abs(_ours(x1, other) - ref) <= 1e-3 * ref + 1e-6 * scale


def _exact_fid64(a: np.ndarray, b: np.ndarray) -> float:
    """float64 FID straight from features: Tr((S_a S_b)^(1/2)) is the nuclear norm
    of Ca Cb^T (C: centred features / sqrt(n-1)), i.e. of Ra Rb^T after QR."""
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    ra, rb = np.linalg.qr(ca, mode="r"), np.linalg.qr(cb, mode="r")
    nuclear = np.linalg.svd(ra @ rb.T, compute_uv=False).sum()
    d = a.mean(0) - b.mean(0)
    return float(d @ d + (ca * ca).sum() + (cb * cb).sum() - 2 * nuclear)


def test_fid_low_rank_wide_spectrum():
    """Trained-classifier-like features: rank 64 of 128, variances 64 .. 1e-4.
    Taking sqrt(eigvalsh(S1^1/2 S2 S1^1/2)) in float32 returned 0.0 for a true
    FID of 0.12 on such features; the SVD-based core must stay accurate."""
    rng = np.random.default_rng(3)
    scales = 8.0 * np.exp(-np.arange(64) / 5.0)
    mix = np.linalg.qr(rng.normal(size=(D, 64)))[0].T  # 64 orthonormal rows
    draw = lambda n: (rng.normal(size=(n, 64)) * scales) @ mix + 0.3
    gen, ref_feats = draw(2000), draw(10000)
    exact = _exact_fid64(gen, ref_feats)
    mu_r, sigma_r = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    sqrt_r = sqrtm_psd64(sigma_r)
    tol = 1e-3 * exact + 1e-6 * 2 * np.trace(sigma_r)
    g = jnp.asarray(gen, jnp.float32)
    assert abs(float(_fid_jit(g, mu_r, sigma_r, sqrt_r)) - exact) <= tol
    assert abs(float(_fid_jit(g, mu_r, sigma_r)) - exact) <= 2 * tol
    mu_g, sigma_g = gaussian_stats(g)
    assert abs(float(fid_from_stats(mu_g, sigma_g, mu_r, sigma_r)) - exact) <= 2 * tol


def test_fid_identical_stats_is_zero(samples):
    mu, sigma = gaussian_stats(jnp.asarray(samples[0], jnp.float32))
    value = float(fid_from_stats(mu, sigma, mu, sigma))
    assert 0.0 <= value <= 1e-6 * float(jnp.trace(sigma))


def test_fid_vmaps_over_population(samples):
    x1, x2, x3 = samples
    sets = [x1, x2, x3, 0.5 * x2 + 1.0]
    stats = [gaussian_stats(jnp.asarray(s, jnp.float32)) for s in sets]
    mus, sigmas = jnp.stack([s[0] for s in stats]), jnp.stack([s[1] for s in stats])
    mu_ref, sigma_ref = gaussian_stats(jnp.asarray(x1, jnp.float32))
    batched = jax.jit(jax.vmap(fid_from_stats, (0, 0, None, None)))
    got = np.asarray(batched(mus, sigmas, mu_ref, sigma_ref))
    alone = np.array([float(fid_from_stats(m, s, mu_ref, sigma_ref)) for m, s in stats])
    np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-4)
    assert got[0] < 1e-3 < got[1]


def test_host_fid_agrees_with_core(samples):
    x1, x2, _ = samples
    mu, sigma = gaussian_stats(jnp.asarray(x2, jnp.float32))
    assert fid(x1, mu, sigma) == pytest.approx(_ours(x1, x2), rel=1e-5)


def test_kid_same_vs_shifted(samples):
    x1, _, x3 = samples
    same, _ = kid(x1, x3, num_subsets=10, subset_size=500, key=jax.random.key(1))
    shifted, _ = kid(x1, x3 + 0.5, num_subsets=10, subset_size=500)
    assert abs(same) < 0.05 * shifted
    assert shifted > 0


def test_inception_score_bounds():
    constant = jnp.tile(jnp.array([[5.0, 1.0, 0.0, -2.0]]), (64, 1))
    assert float(inception_score(constant)) == pytest.approx(1.0, abs=1e-5)
    confident = 50.0 * jax.nn.one_hot(jnp.arange(100) % 10, 10)
    assert float(inception_score(confident)) == pytest.approx(10.0, rel=1e-4)
    random = jax.random.normal(jax.random.key(0), (200, 10))
    assert 1.0 <= float(inception_score(random)) <= 10.0


def test_class_histogram():
    logits = jax.random.normal(jax.random.key(0), (300, 10))
    hist = np.asarray(class_histogram(logits, num_classes=10))
    assert hist.shape == (10,) and hist.min() >= 0
    assert hist.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(
        class_histogram(jnp.eye(4)[jnp.array([0, 0, 3])], 4), [2 / 3, 0, 0, 1 / 3]
    )


def test_bad_features_raise(samples):
    x1 = samples[0]
    mu, sigma = gaussian_stats(jnp.asarray(x1, jnp.float32))
    with pytest.raises(UserError, match="expected"):
        fid(x1[:, :64], mu, sigma)
    with pytest.raises(UserError, match=f"at least {D + 1}"):
        fid(x1[:100], mu, sigma)
    bad = x1.copy()
    bad[3, 7] = np.nan
    with pytest.raises(UserError, match="NaN"):
        fid(bad, mu, sigma)
    with pytest.raises(UserError, match="NaN"):
        kid(bad, x1)
    with pytest.raises(UserError):
        check_features(x1[0], D)


def test_jitted_core_gives_inf_not_nan(samples):
    x1 = samples[0]
    mu, sigma = gaussian_stats(jnp.asarray(x1, jnp.float32))
    bad = jnp.asarray(x1, jnp.float32).at[0, 0].set(jnp.nan)
    assert float(_fid_jit(bad, mu, sigma)) == np.inf
    pop = jnp.stack([jnp.asarray(x1[:500], jnp.float32), bad[:500]])
    values = jax.jit(jax.vmap(fid_from_features, (0, None, None)))(pop, mu, sigma)
    assert np.isfinite(values[0]) and values[1] == np.inf


# --- classifier training, checkpoint and loader ------------------------------


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory):
    """The first 1000 train / 500 test Fashion-MNIST images as a data_dir."""
    root = tmp_path_factory.mktemp("fmnist")
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    for split, n in (("train", 1000), ("test", 500)):
        ds = load_fmnist(split)
        _write_idx(root / names[split][0], ds.images[:n, ..., 0], 2051)
        _write_idx(root / names[split][1], ds.labels[:n], 2049)
    return root


TINY = ClassifierTrainConfig(
    model=ClassifierConfig(widths=(8,), feature_dim=8, num_groups=4),
    batch_size=16,
    num_steps=32,
    steps_per_call=8,
    learning_rate=1e-2,
    warmup_steps=2,
    train_subset=512,
    fid_floor_sizes=(200,),
)


@pytest.fixture(scope="module")
def trained(small_fmnist, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clf") / "fmnist_classifier"
    out = train_classifier(TINY, workdir, data_dir=small_fmnist, progress=False)
    return workdir, out


def test_training_reduces_loss_and_writes_card(trained):
    workdir, out = trained
    losses = [h["loss"] for h in out["loss_history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    card = json.loads((workdir / "card.json").read_text())
    assert card["steps"] == 32 and 0.0 <= card["test_accuracy"] <= 1.0
    assert card["config"]["model"]["widths"] == [8]
    floor = card["fid_floor_train_vs_test"]["200"]
    assert np.isfinite(floor["mean"]) and len(floor["values"]) == 5
    assert not list(workdir.parent.glob(".*tmp*"))  # temporary dir renamed away


def test_checkpoint_round_trip(trained, small_fmnist):
    workdir, _ = trained
    net = load_feature_net(workdir)
    assert isinstance(net, FeatureNet) and net.feature_dim == 8
    images = load_fmnist("test", small_fmnist).images[:37]
    feats, logits = net.extract(images, batch_size=16)  # pads the last batch
    assert feats.shape == (37, 8) and logits.shape == (37, 10)
    fresh = load_feature_net(workdir)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(
        jax.jit(lambda n, x: n.logits(x))(net, x),
        jax.jit(lambda n, x: n.logits(x))(fresh, x),
    )
    np.testing.assert_allclose(logits, net.logits(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="NaN"):
        net.extract(np.full((2, 28, 28, 1), np.nan, np.float32))


def test_reference_stats_round_trip(trained, small_fmnist):
    workdir, _ = trained
    net = load_feature_net(workdir)
    stats = load_reference_stats(workdir, net)
    assert stats["mu_test"].shape == (8,) and stats["sigma_train"].shape == (8, 8)
    again = compute_reference_stats(net, small_fmnist, out_path=workdir / "x.npz")
    np.testing.assert_allclose(again["sigma_test"], stats["sigma_test"], rtol=1e-5)
    floor = fid_floor(
        net, stats, subset_sizes=(100,), num_subsets=3, data_dir=small_fmnist
    )
    assert floor["100"]["mean"] > 0
    other = FeatureNet(jax.tree.map(lambda p: p * 1.01, net.params), net.config)
    with pytest.raises(UserError, match="different feature net"):
        load_reference_stats(workdir, other)
    with pytest.raises(UserError, match="exceed"):
        fid_floor(
            net, stats, subset_sizes=(100,), num_subsets=20, data_dir=small_fmnist
        )


def test_load_feature_net_missing_and_corrupt(trained, tmp_path):
    with pytest.raises(UserError, match="no feature net"):
        load_feature_net(tmp_path / "nope")
    garbage = tmp_path / "garbage"
    (garbage / "params").mkdir(parents=True)
    (garbage / "card.json").write_bytes(b"\x00\xffnot json")
    (garbage / "params" / "_METADATA").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_feature_net(garbage)
    broken = tmp_path / "broken"
    shutil.copytree(trained[0], broken)
    for f in (broken / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_feature_net(broken)


def test_workdir_not_overwritten(trained, small_fmnist):
    with pytest.raises(UserError, match="not empty"):
        train_classifier(TINY, trained[0], data_dir=small_fmnist, progress=False)


def test_config_validation():
    with pytest.raises(UserError, match="exceeds the last width"):
        ClassifierConfig(widths=(16, 32), feature_dim=64)
    with pytest.raises(UserError, match="divisible"):
        ClassifierConfig(widths=(12,), feature_dim=8, num_groups=8)


def test_configdict_round_trip():
    spec = importlib.util.spec_from_file_location(
        "clf_cfg", REPO / "configs/classifier.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = ClassifierTrainConfig.from_configdict(module.get_config())
    assert cfg.batch_size == 256 and cfg.model.feature_dim == 128
    assert cfg.num_steps * cfg.batch_size >= 15 * 60000
    with pytest.raises(UserError, match="unknown"):
        ClassifierTrainConfig.from_configdict({"batch_sise": 3})
