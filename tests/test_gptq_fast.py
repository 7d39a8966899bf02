"""The jitted, width-vmapped GPTQ (`gptq_widths`, `gptq_best_clip`) gives bitwise
the weights of the per-width loop run op by op (the path `gptq_seq` used to run
under intercept, where jit is off)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.quant import numerics
from tmpq_jax.quant.gptq import (
    PERCDAMP,
    _inverse_hessian_factor,
    gptq_integers,
    gptq_widths,
)
from tmpq_jax.quant.gptq_seq import gptq_best_clip

pytestmark = pytest.mark.filterwarnings(
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)


def _data(n=40, c=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(512, n)) @ (np.eye(n) + 0.3 * rng.normal(size=(n, n)))
    X[:, 3] = 0.0  # a dead input
    H = (X.T @ X / len(X)).astype(np.float32)
    w = rng.standard_t(3, size=(n, c)).astype(np.float32)
    clip = rng.uniform(0.6, 1.0, size=(3, c)).astype(np.float32)
    return w, H, clip


def _reference(w, H, clip, widths):
    """The former per-width loop, eagerly, op by op."""
    with jax.disable_jit():
        w, H = jnp.asarray(w), jnp.asarray(H)
        perm = jnp.argsort(-jnp.diag(H))
        Hinv, dead = _inverse_hessian_factor(H[perm][:, perm], PERCDAMP)
        out = []
        for k, b in enumerate(widths):
            spec = numerics.WeightQuant(int(b), jnp.asarray(clip[k]))
            scale = jnp.ravel(numerics.fake_quant_weight(w, spec)[1])
            q = gptq_integers(w[perm].T, Hinv, dead, scale, jnp.int32(b)).T
            out.append(q[jnp.argsort(perm)] * scale)
        return np.stack(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_vmapped_widths_equal_the_per_width_loop(seed):
    w, H, clip = _data(seed=seed)
    widths = (8, 5, 3)
    got, _ = gptq_widths(w, H, clip, widths)
    want = _reference(w, H, clip, widths)
    np.testing.assert_array_equal(np.asarray(got), want)
    # and each width is its own: a swapped width order swaps the rows
    swapped, _ = gptq_widths(w, H, clip[::-1], widths[::-1])
    np.testing.assert_array_equal(np.asarray(swapped)[::-1], want)


def test_best_clip_equals_the_eager_choice():
    w, H, clip = _data(seed=2)
    grid = (0.7, 0.9, 1.0, 1.2)
    got, _ = gptq_best_clip(w, H, clip[0], 4, PERCDAMP, grid)
    clips = np.stack([np.minimum(clip[0] * g, 1.0) for g in grid]).astype(np.float32)
    cands = _reference(w, H, clips, [4] * len(grid))
    d = cands - w[None]
    err = np.stack([np.sum(x * (H.astype(np.float64) @ x), axis=0) for x in d])
    want = cands[np.argmin(err, axis=0), :, np.arange(w.shape[1])].T
    np.testing.assert_array_equal(np.asarray(got), want)
