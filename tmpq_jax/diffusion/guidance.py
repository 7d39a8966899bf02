"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) for flow models.

v = v_cond + (w - 1) (v_cond - v_null): w = 1 is the conditional model exactly,
w = 0 the unconditional one. The conditional and the null batch run as ONE
forward of twice the batch (one set of matmuls, as a deployed model runs them),
and the scale w is an array, so one compiled sampler serves every scale.

`model_fn(x, t, y)` is the model: x [B, H, W, C], t float [B], y int [B]
(the null class is `config.null_label`); an unconditional model's is `(x, t)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.diffusion.flow import VelocityFn, check_sampler, flow_sample
from tmpq_jax.errors import UserError

ModelFn = Callable[..., jax.Array]


def balanced_labels(key: jax.Array, num: int, num_classes: int) -> jax.Array:
    """`num` labels, every class num // K or num // K + 1 times (which classes get
    the extra one is random), in random order. int32[num]."""
    if num_classes < 1:
        raise UserError("class labels asked of an unconditional model (0 classes).")
    k_cls, k_pos = jax.random.split(key)
    order = jax.random.permutation(k_cls, num_classes)
    return jax.random.permutation(k_pos, order[jnp.arange(num) % num_classes]).astype(
        jnp.int32
    )


def check_labels(labels: Any, num_classes: int) -> None:
    """Refuses labels outside [0, num_classes) when they are concrete (a traced
    array can't be checked; the embedding table would clamp it silently)."""
    try:
        arr = np.asarray(labels)
    except jax.errors.TracerArrayConversionError:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"class labels must be integers, got {arr.dtype}.")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise UserError(
            f"class {int(bad[0])} is outside the model's label set "
            f"0..{num_classes - 1}."
        )


def guided_velocity(
    model_fn: ModelFn, labels: jax.Array, null_label: int, scale: jax.Array
) -> VelocityFn:
    """The CFG velocity `(x, t) -> v` for fixed `labels`; `scale` may be traced."""
    labels = jnp.asarray(labels, jnp.int32)
    y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
    scale = jnp.asarray(scale, jnp.float32)

    def velocity_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
        cond, null = jnp.split(out, 2)
        return cond + (scale - 1.0) * (cond - null)

    return velocity_fn


def guided_sample(
    key: jax.Array,
    model_fn: ModelFn,
    config: Any,
    times: jax.Array,
    *,
    labels: jax.Array | None = None,
    num: int | None = None,
    guidance_scale: float | jax.Array | None = None,
    solver: str = "euler",
) -> jax.Array:
    """Samples x_0 [B, H, W, C] (unclipped) from a velocity model, starting at
    noise drawn from `key` and integrating over `times` (1 -> 0; traced OK).

    `config` declares the model (`prediction`, `num_classes`, `null_label`,
    `image_size`, `channels`: a `DiTConfig`). A conditional model takes `labels`
    (B = len(labels); `balanced_labels` makes them) or, with `labels=None`, samples
    the null class for `num` images. `guidance_scale=None`: no guidance (one
    batch); else CFG with that (traceable) scale, which needs labels.
    """
    check_sampler(solver, config)
    conditional = getattr(config, "num_classes", 0) > 0
    if not conditional and (labels is not None or guidance_scale is not None):
        raise UserError(
            "guidance and labels need a class-conditional model; this one is "
            "unconditional (num_classes=0): leave out labels and the guidance scale."
        )
    if labels is not None:
        check_labels(labels, config.num_classes)
        labels = jnp.asarray(labels, jnp.int32)
        num = labels.shape[0]
    elif guidance_scale is not None:
        raise UserError("guidance needs class labels: pass labels (balanced_labels).")
    if num is None:
        raise UserError("give labels or the number of images to sample.")
    shape = (num, config.image_size, config.image_size, config.channels)
    x1 = jax.random.normal(key, shape)
    if guidance_scale is not None:
        fn = guided_velocity(model_fn, labels, config.null_label, guidance_scale)
    elif labels is not None:
        fn = lambda x, t: model_fn(x, t, labels)
    else:
        fn = lambda x, t: model_fn(x, t)  # unconditional, or the null class
    return flow_sample(fn, x1, times, solver, config)
