"""Sampling an exported DiT (flow matching), class-conditional with guidance.

The DiT's counterpart of `sampling.sample`: Euler or Heun over the shifted time
grid (`diffusion/flow.py`), classifier-free guidance with a traced scale
(`diffusion/guidance.py`), in batches; one compiled sampler per batch shape
serves every scale and class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.diffusion.flow import check_sampler, flow_times
from tmpq_jax.diffusion.guidance import balanced_labels, check_labels, guided_sample
from tmpq_jax.errors import ArgumentError
from tmpq_jax.models.dit import DiT, DiTConfig


def make_sampler(config: DiTConfig, params, solver: str = "euler", model_fn=None):
    """Jitted (key, times, labels | None, scale | None) -> x_0 [B, H, W, C];
    `model_fn(x, t, *y)`: the model (default: the float DiT of `params`)."""
    check_sampler(solver, config)
    if model_fn is None:
        model = DiT(config)
        model_fn = lambda x, t, *y: model.apply({"params": params}, x, t, *y)  # noqa: E731
    fn = model_fn

    @jax.jit
    def guided(key, times, labels, scale):
        return guided_sample(
            key, fn, config, times, labels=labels, guidance_scale=scale, solver=solver
        )

    @functools.partial(jax.jit, static_argnums=3)
    def plain(key, times, labels, num):
        return guided_sample(
            key, fn, config, times, labels=labels, num=num, solver=solver
        )

    def run(key, times, labels, scale, num=None):
        if scale is None:
            return plain(key, times, labels, num)
        return guided(key, times, labels, jnp.float32(scale))

    return run


def sample_dit(
    key: jax.Array,
    config: DiTConfig,
    params,
    num: int,
    steps: int = 10,
    *,
    label: int | None = None,
    guidance: float | None = None,
    shift: float = 1.0,
    solver: str = "euler",
    batch_size: int = 500,
    model_fn=None,
    times=None,
) -> np.ndarray:
    """`num` images in [-1, 1]: class `label` (None: balanced over the classes),
    guided at scale `guidance` (None: the conditional model alone). `model_fn`:
    another model than the float one of `params` (the int8 one of a genome);
    `times`: the grid (1 -> 0) instead of `steps` shifted ones."""
    if num < 1:
        raise ArgumentError("num", f"{{arg}}={num}: ask for at least one image.")
    if steps < 1:
        raise ArgumentError("num_steps", f"{{arg}}={steps}: use at least one step.")
    if label is not None:
        check_labels(np.asarray([label]), config.num_classes)
    if not config.conditional and (label is not None or guidance is not None):
        raise ArgumentError(
            "guidance",
            "this DiT is unconditional (no classes): leave out the class and {arg}.",
        )
    run = make_sampler(config, params, solver, model_fn)
    if times is None:
        times = flow_times(steps, shift)
    times = jnp.asarray(times, jnp.float32)
    k_lab, k_x = jax.random.split(key)
    batch = min(batch_size, num)
    if not config.conditional:
        labels = None
    elif label is not None:
        labels = jnp.full((num,), label, jnp.int32)
    else:
        labels = balanced_labels(k_lab, num, config.num_classes)
    out = []
    for i, s in enumerate(range(0, num, batch)):
        lab = None
        if labels is not None:
            lab = labels[s : s + batch]
            if lab.shape[0] < batch:  # one compiled shape: pad the last batch
                pad = jnp.full((batch - lab.shape[0],), lab[0])
                lab = jnp.concatenate([lab, pad])
        k = jax.random.fold_in(k_x, i)
        out.append(
            np.asarray(run(k, times, lab, guidance, None if lab is not None else batch))
        )
    return np.clip(np.concatenate(out)[:num], -1.0, 1.0)
