"""FID, KID, Inception-style score and class histogram in pure JAX.

The feature space is the project's Fashion-MNIST classifier (DESIGN.md section 4),
so report these as "FID (FMNIST classifier features)", never as Inception FID.

FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). Tr((S1 S2)^(1/2)) equals the
sum of sqrt(eig(S1^(1/2) S2 S1^(1/2))) (DESIGN.md), i.e. the sum of the singular
values of S1^(1/2) S2^(1/2); we take the singular values (`svd`, values only), and
build roots with `eigh` -- all jittable and vmappable, no scipy sqrtm. Why not
eigvalsh + sqrt: see `fid_from_stats` (float32 noise in near-null directions).

Two layers:
- jittable cores (`gaussian_stats`, `sqrtm_psd`, `fid_from_stats`,
  `fid_from_features`, `kid_core`, `inception_score`, `class_histogram`): no
  checks, never a silent NaN -- a non-finite FID (NaN features, e.g. a diverged
  sampler) becomes +inf, so a search that minimises FID ranks such candidates last;
- host entry points (`fid`, `kid`, `check_features`): validate shapes, sample count
  and finiteness, and raise `UserError` with a one-line message.

Precision: all matmuls use Precision.HIGHEST (GPUs default to TF32 for float32,
which costs ~3 digits). Features are centred before the covariance. Float32 is the
default; if `jax_enable_x64` is on, the FID core computes in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError

_HI = jax.lax.Precision.HIGHEST


def _dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def gaussian_stats(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean [D] and unbiased covariance [D, D] of `features` [N, D] (jittable).

    Centred before the product (two-pass) so float32 keeps its digits. With
    N <= D the covariance is singular; `fid_from_stats` still returns a finite
    number (eigenvalues are clipped at 0), but the host entry points refuse it.
    """
    f = jnp.asarray(features).astype(_dtype())
    n = f.shape[0]
    mu = jnp.mean(f, axis=0)
    c = f - mu
    sigma = jnp.matmul(c.T, c, precision=_HI) / max(n - 1, 1)
    return mu, 0.5 * (sigma + sigma.T)


def sqrtm_psd(sigma: jax.Array) -> jax.Array:
    """Symmetric PSD square root via `eigh`, eigenvalues clipped at 0 (jittable).

    Float32 caveat: eigenvalues carry absolute error ~eps * max eigenvalue, so in
    near-null directions the root is ~sqrt(eps * max) instead of 0. For fixed
    reference stats use the float64 root that `reference.py` stores.
    """
    s = jnp.asarray(sigma, _dtype())
    w, v = jnp.linalg.eigh(0.5 * (s + s.T))
    return jnp.matmul(v * jnp.sqrt(jnp.clip(w, 0.0))[None, :], v.T, precision=_HI)


def _nuclear_norm(m: jax.Array) -> jax.Array:
    return jnp.sum(jnp.linalg.svd(m, compute_uv=False))


def _finish(mu1, mu2, tr1, tr2, tr_covmean) -> jax.Array:
    diff = mu1 - mu2
    value = jnp.dot(diff, diff, precision=_HI) + tr1 + tr2 - 2.0 * tr_covmean
    value = jnp.maximum(value, 0.0)  # NaN survives maximum; mapped to inf below
    return jnp.where(jnp.isfinite(value), value, jnp.inf)


def fid_from_stats(
    mu1, sigma1, mu2, sigma2, sqrt_sigma1=None, sqrt_sigma2=None
) -> jax.Array:
    """Frechet distance between two Gaussians (jittable, vmappable).

    Tr((S1 S2)^(1/2)) = sum of singular values of S1^(1/2) S2^(1/2) (= sum of
    sqrt(eig(S1^(1/2) S2 S1^(1/2))) of DESIGN.md, without squaring: eigvalsh of
    that product has eigenvalue noise eps*|S1||S2| which sqrt blows up in the many
    near-null directions a trained classifier's features have -- in float32 it
    turned a true FID of 0.12 into 0.0). Pass precomputed (e.g. float64) roots to
    skip `sqrtm_psd`. Returns a scalar >= 0, or +inf when any input is non-finite.
    """
    dt = _dtype()
    r1 = sqrtm_psd(sigma1) if sqrt_sigma1 is None else jnp.asarray(sqrt_sigma1, dt)
    r2 = sqrtm_psd(sigma2) if sqrt_sigma2 is None else jnp.asarray(sqrt_sigma2, dt)
    tr_covmean = _nuclear_norm(jnp.matmul(r1, r2, precision=_HI))
    tr1 = jnp.trace(jnp.asarray(sigma1, dt))
    tr2 = jnp.trace(jnp.asarray(sigma2, dt))
    return _finish(jnp.asarray(mu1, dt), jnp.asarray(mu2, dt), tr1, tr2, tr_covmean)


def fid_from_features(features, mu_ref, sigma_ref, sqrt_sigma_ref=None) -> jax.Array:
    """FID of `features` [N, D] against reference stats (jittable; NaN -> +inf).

    The most accurate path: with C the centred features / sqrt(N-1) (so S = C^T C)
    and R = S_ref^(1/2), Tr((S S_ref)^(1/2)) is the nuclear norm of C R, taken as
    that of Rc R where C = Q Rc (QR keeps singular values, shrinks N x D to D x D).
    No square root of the sample covariance is ever formed.
    """
    dt = _dtype()
    f = jnp.asarray(features).astype(dt)
    n = f.shape[0]
    mu = jnp.mean(f, axis=0)
    c = (f - mu) / jnp.sqrt(jnp.asarray(max(n - 1, 1), dt))
    rc = jnp.linalg.qr(c, mode="r")
    r_ref = sqrtm_psd(sigma_ref) if sqrt_sigma_ref is None else sqrt_sigma_ref
    r_ref = jnp.asarray(r_ref, dt)
    tr_covmean = _nuclear_norm(jnp.matmul(rc, r_ref, precision=_HI))
    tr_ref = jnp.trace(jnp.asarray(sigma_ref, dt))
    return _finish(mu, jnp.asarray(mu_ref, dt), jnp.sum(c * c), tr_ref, tr_covmean)


def check_features(features, dim: int, min_samples: int | None = None) -> np.ndarray:
    """Host-side validation: [N, dim], finite, N > dim. Returns a float32 array."""
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[1] != dim:
        raise UserError(
            f"features have shape {f.shape}, expected [N, {dim}]; extract them with "
            "the same feature net that made the reference statistics."
        )
    need = dim + 1 if min_samples is None else min_samples
    if f.shape[0] < need:
        why = (
            f" (more than the {dim} feature dims, else the covariance is singular); "
            "use >= 2000 for a stable FID"
            if min_samples is None
            else ""
        )
        raise UserError(f"{f.shape[0]} samples are too few: need at least {need}{why}.")
    if not np.all(np.isfinite(f)):
        bad = int(np.sum(~np.all(np.isfinite(f), axis=1)))
        raise UserError(
            f"{bad} of {f.shape[0]} feature rows are NaN/inf; the images fed to the "
            "feature net were not finite (check the sampler's output)."
        )
    return f.astype(np.float32, copy=False)


def _check_stats(mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise UserError(
            f"reference stats have mu {mu.shape} and sigma {sigma.shape}; expected "
            "[D] and [D, D]. Recompute them with compute_reference_stats."
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise UserError("reference stats contain NaN/inf; recompute them.")
    return mu, sigma


def fid(features, mu_ref, sigma_ref, sqrt_sigma_ref=None) -> float:
    """Host entry: validated FID of `features` [N, D] against the reference stats
    (pass `sqrt_sigma_ref`, e.g. from `load_reference_stats`, for full accuracy)."""
    mu_ref, sigma_ref = _check_stats(mu_ref, sigma_ref)
    f = check_features(features, mu_ref.shape[0])
    if sqrt_sigma_ref is not None:
        _, sqrt_sigma_ref = _check_stats(mu_ref, sqrt_sigma_ref)
    return float(_fid_features_jit(f, mu_ref, sigma_ref, sqrt_sigma_ref))


_fid_features_jit = jax.jit(fid_from_features)


def _poly_mmd(x: jax.Array, y: jax.Array) -> jax.Array:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (as in KID / clean-fid)."""
    m, d = x.shape
    k = lambda a, b: (jnp.matmul(a, b.T, precision=_HI) / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within = jnp.sum(kxx) + jnp.sum(kyy) - jnp.trace(kxx) - jnp.trace(kyy)
    return (within / (m - 1) - 2.0 * jnp.sum(kxy) / m) / m


def kid_core(feat1, feat2, key, num_subsets: int, subset_size: int) -> jax.Array:
    """Per-subset unbiased MMD^2 values [num_subsets] (jittable with static sizes)."""
    f1 = jnp.asarray(feat1, jnp.float32)
    f2 = jnp.asarray(feat2, jnp.float32)

    def one(k):
        k1, k2 = jax.random.split(k)
        i1 = jax.random.choice(k1, f1.shape[0], (subset_size,), replace=False)
        i2 = jax.random.choice(k2, f2.shape[0], (subset_size,), replace=False)
        return _poly_mmd(f1[i1], f2[i2])

    values = jax.lax.map(one, jax.random.split(key, num_subsets))
    return jnp.where(jnp.isfinite(values), values, jnp.inf)


_kid_jit = jax.jit(kid_core, static_argnames=("num_subsets", "subset_size"))


def kid(
    feat1, feat2, num_subsets: int = 100, subset_size: int = 1000, key=None
) -> tuple[float, float]:
    """Host entry: KID (mean, std over subsets) between two feature sets.

    `subset_size` is capped at the smaller set's size. Can be slightly negative
    for matching distributions (the estimator is unbiased).
    """
    f1 = np.asarray(feat1)
    dim = f1.shape[1] if f1.ndim == 2 else -1
    f1 = check_features(f1, dim, min_samples=2)
    f2 = check_features(feat2, dim, min_samples=2)
    m = int(min(subset_size, f1.shape[0], f2.shape[0]))
    if num_subsets < 1 or m < 2:
        raise UserError("KID needs num_subsets >= 1 and subset_size >= 2.")
    key = jax.random.key(0) if key is None else key
    values = np.asarray(
        _kid_jit(f1, f2, key, num_subsets=int(num_subsets), subset_size=m)
    )
    return float(values.mean()), float(values.std())


def inception_score(logits) -> jax.Array:
    """exp(mean_x KL(p(y|x) || p(y))) from classifier logits [N, C] (jittable).

    1 when every prediction is the same; C when predictions are confident and
    spread evenly over the C classes.
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    p = jnp.exp(logp)
    log_py = jnp.log(jnp.mean(p, axis=0))
    # p == 0 where a class is never predicted: 0 * (finite - -inf) would be NaN.
    terms = jnp.where(p > 0, p * (logp - log_py[None, :]), 0.0)
    kl = jnp.sum(terms, axis=-1)
    return jnp.exp(jnp.mean(kl))


def class_histogram(logits, num_classes: int = 10) -> jax.Array:
    """Fraction of samples assigned (argmax) to each class, [num_classes] (jittable)."""
    pred = jnp.argmax(jnp.asarray(logits), axis=-1)
    return jnp.mean(jax.nn.one_hot(pred, num_classes, dtype=jnp.float32), axis=0)
