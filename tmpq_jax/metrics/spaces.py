"""Evaluation spaces that need no trained network, and k-NN precision/recall.

* Pixel space: images average-pooled to at most `PIXEL_DIMS` values (28x28x1 ->
  14x14 = 196), flattened; the FID of those Gaussians ("FID (pixels)") sees
  intensity, layout and blur, and cannot be fooled the way one classifier's
  features can.
* Improved precision and recall (Kynkaenniemi et al., NeurIPS 2019): a generated
  sample is "precise" when it falls inside the k-NN ball of some real sample; a
  real sample is "recalled" when it falls inside the k-NN ball of some generated
  one (k = 3, Euclidean distance in a feature space).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError

PIXEL_DIMS = 256  # at most this many pooled pixel values per image
PR_K = 3


def pixel_pool(image_shape) -> int:
    """The pooling factor that brings `image_shape` down to <= PIXEL_DIMS values."""
    h, w, c = (int(d) for d in image_shape)
    f = 1
    while math.ceil(h / f) * math.ceil(w / f) * c > PIXEL_DIMS:
        f += 1
    return f


def pixel_features(images) -> jax.Array:
    """Images [N, H, W, C] in [-1, 1] -> [N, D] pooled pixels (jittable)."""
    x = jnp.asarray(images, jnp.float32)
    n, h, w, c = x.shape
    f = pixel_pool((h, w, c))
    if f > 1:
        ph, pw = -h % f, -w % f
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
        x = x.reshape(n, (h + ph) // f, f, (w + pw) // f, f, c).mean((2, 4))
    return x.reshape(n, -1)


def _kth_radii(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance of each row of x to its k-th nearest other row."""
    xj = jnp.asarray(x)
    out = []
    for s in range(0, len(x), chunk):
        d = _pairwise(xj[s : s + chunk], xj)
        # the row itself is at distance 0: the (k+1)-th smallest is the k-th other
        out.append(np.asarray(-jax.lax.top_k(-d, k + 1)[0][:, k]))
    return np.concatenate(out)


@jax.jit
def _pairwise(a, b):
    hi = jax.lax.Precision.HIGHEST
    d2 = (
        jnp.sum(a * a, 1)[:, None]
        + jnp.sum(b * b, 1)[None, :]
        - 2.0 * jnp.matmul(a, b.T, precision=hi)
    )
    return jnp.sqrt(jnp.maximum(d2, 0.0))


def _coverage(query: np.ndarray, ref: np.ndarray, radii: np.ndarray, chunk=1024):
    """Fraction of `query` rows within radii[i] of some ref row i."""
    rj, rad = jnp.asarray(ref), jnp.asarray(radii)
    inside = []
    for s in range(0, len(query), chunk):
        d = _pairwise(jnp.asarray(query[s : s + chunk]), rj)
        inside.append(np.asarray(jnp.any(d <= rad[None, :], axis=1)))
    return float(np.mean(np.concatenate(inside)))


def precision_recall(real, fake, k: int = PR_K) -> dict:
    """Improved precision and recall of `fake` [N, D] against `real` [M, D]
    features (host entry; both need more than k rows)."""
    real = np.asarray(real, np.float32)
    fake = np.asarray(fake, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise UserError(
            f"precision/recall takes two [N, D] feature sets, got {real.shape} and "
            f"{fake.shape}."
        )
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall needs more than k={k} samples per set.")
    if not (np.isfinite(real).all() and np.isfinite(fake).all()):
        raise UserError("precision/recall: the features contain NaN/inf.")
    return {
        "precision": _coverage(fake, real, _kth_radii(real, k)),
        "recall": _coverage(real, fake, _kth_radii(fake, k)),
        "k": int(k),
    }
