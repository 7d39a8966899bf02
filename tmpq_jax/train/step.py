"""The pure training step: DDPM epsilon loss, AdamW with warmup, EMA of the params.

`make_train_steps` (the UNet's eps objective) and `make_flow_train_steps` (the
flow-matching velocity objective of `diffusion/flow.py`, with labels) return a
function running `n` steps with the whole dataset on device. Each step's
randomness is `fold_in(key, step)`, so the result depends only on the step count,
never on how steps were split into calls: resuming from a checkpoint reproduces
an uninterrupted run exactly.

How the `n` steps run (`loop=`): one jitted `lax.scan` ("scan": one dispatch per
call), or `n` calls of one jitted step from Python ("python"). By default the
UNet's steps take "python" on XLA's CPU backend and "scan" elsewhere: XLA:CPU
rewrites convolutions into the layout of its fast (Eigen) kernels only outside
loop bodies, so a UNet step inside a scan -- even of length 1 -- ran ~11x slower
than the same step jitted alone. The DiT's flow steps (one patchify convolution)
keep "scan" everywhere: on CPU it measured ~15% faster than the plain jitted
step (benchmarks/cpu.py, results/cpu.json). The two paths compute the same step;
they may differ at float rounding level (XLA picks other kernels).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from tmpq_jax.config import TrainConfig
from tmpq_jax.diffusion.flow import FlowConfig, flow_loss
from tmpq_jax.diffusion.schedules import NoiseSchedule
from tmpq_jax.models import dit
from tmpq_jax.models.unet import UNetConfig, init_params


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar
    params: dict
    ema_params: dict
    opt_state: optax.OptState


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    lr = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        max(cfg.warmup_steps, 1),
        max(cfg.num_steps, cfg.warmup_steps + 1),
        end_value=0.1 * cfg.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr, weight_decay=cfg.weight_decay),
    )


def create_train_state(
    key: jax.Array, model_cfg: UNetConfig | dit.DiTConfig, train_cfg: TrainConfig
) -> TrainState:
    if isinstance(model_cfg, dit.DiTConfig):
        params = dit.init_params(model_cfg, key)
    else:
        params = init_params(model_cfg, key)
    opt_state = make_optimizer(train_cfg).init(params)
    ema = jax.tree.map(jnp.copy, params)  # distinct buffers: the state is donated
    return TrainState(jnp.zeros((), jnp.int32), params, ema, opt_state)


def ddpm_loss(
    params, model: nn.Module, sched: NoiseSchedule, x0: jax.Array, key: jax.Array
):
    """Mean squared error of the predicted noise at a uniformly drawn timestep."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.num_timesteps)
    eps = jax.random.normal(k_eps, x0.shape)
    ab = sched.alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    pred = model.apply({"params": params}, x_t, t)
    return jnp.mean((pred - eps) ** 2)


def _apply_grads(
    state: TrainState, grads, tx: optax.GradientTransformation, cfg: TrainConfig
) -> TrainState:
    """One optimizer update, the EMA and the step count (every objective's)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up (as in many DDPM codebases): early on, track the params closely.
    decay = jnp.minimum(cfg.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(
        lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
    )
    return state.replace(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
    )


LOOPS = ("scan", "python")


def _resolve_loop(loop: str | None, cpu: str = "python") -> str:
    """The step loop to use: `loop`, or `cpu` on the CPU backend, else "scan"."""
    if loop is None:
        return cpu if jax.default_backend() == "cpu" else "scan"
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r}; expected one of {LOOPS} or None")
    return loop


def _python_steps(one_step):
    """`fn(state, *data, key, n) -> (state, losses[n])`: n calls of one jitted step.

    `one_step((state, *data, key), None) -> ((state, *data, key), loss)` is the
    scan body; the jitted step returns only (state, loss), so the dataset is
    never copied out.
    """

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, *rest):
        (state, *_), loss = one_step((state, *rest), None)
        return state, loss

    def train_steps(state, *args):
        *rest, n = args
        rest = jax.device_put(rest)  # host arrays go to the device once, not per step
        losses = []
        for _ in range(n):
            state, loss = step(state, *rest)
            losses.append(loss)
        return state, jnp.stack(losses) if losses else jnp.zeros((0,), jnp.float32)

    return train_steps


def make_train_steps(
    model: nn.Module, sched: NoiseSchedule, cfg: TrainConfig, loop: str | None = None
):
    """-> `fn(state, images_u8, key, n) -> (state, losses[n])`, n static; `loop`
    "scan" | "python" | None (by backend: "python" on CPU), see the module doc."""
    tx = make_optimizer(cfg)

    def one_step(carry, _):
        state, images, key = carry
        k = jax.random.fold_in(key, state.step)
        k_idx, k_loss = jax.random.split(k)
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
        x0 = images[idx].astype(jnp.float32) / 127.5 - 1.0
        loss, grads = jax.value_and_grad(ddpm_loss)(
            state.params, model, sched, x0, k_loss
        )
        return (_apply_grads(state, grads, tx, cfg), images, key), loss

    if _resolve_loop(loop) == "python":
        return _python_steps(one_step)

    @functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
    def train_steps(state: TrainState, images: jax.Array, key: jax.Array, n: int):
        (state, _, _), losses = jax.lax.scan(
            one_step, (state, images, key), None, length=n
        )
        return state, losses

    return train_steps


def make_flow_train_steps(
    model: nn.Module, flow: FlowConfig, cfg: TrainConfig, loop: str | None = None
):
    """-> `fn(state, images_u8, labels, key, n) -> (state, losses[n])`.

    The flow-matching objective for a `DiT`; `labels` int32[N] (ignored by an
    unconditional model: pass any array of the images' length). Same batching,
    keys (fold_in(key, step)) and update as `make_train_steps`, so resuming is
    exact here too; `loop` None is "scan" on every backend (module doc).
    """
    tx = make_optimizer(cfg)
    mcfg = model.config
    null = mcfg.null_label if mcfg.conditional else None

    def one_step(carry, _):
        state, images, labels, key = carry
        k = jax.random.fold_in(key, state.step)
        k_idx, k_loss = jax.random.split(k)
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
        x0 = images[idx].astype(jnp.float32) / 127.5 - 1.0
        y = labels[idx] if mcfg.conditional else None
        loss, grads = jax.value_and_grad(flow_loss)(
            state.params, model, flow, x0, y, k_loss, null
        )
        return (_apply_grads(state, grads, tx, cfg), images, labels, key), loss

    if _resolve_loop(loop, cpu="scan") == "python":
        return _python_steps(one_step)

    @functools.partial(jax.jit, static_argnums=4, donate_argnums=0)
    def train_steps(state, images, labels, key, n: int):
        (state, *_), losses = jax.lax.scan(
            one_step, (state, images, labels, key), None, length=n
        )
        return state, losses

    return train_steps
