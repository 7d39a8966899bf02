"""Block-wise output reconstruction: learned step sizes on top of the min-MSE stage.

TMPQ-DM (arXiv 2404.09532) calibrates its supernet BRECQ / Q-Diffusion style:
each block's quantization parameters are fit so that the block's *output* matches
full precision, not each tensor in isolation. Here the parameters are those of
`supernet.QParams`, unchanged in shape (nothing downstream changes): per layer and
width the per-output-channel weight clip ratios `w_clip` and the per-tensor
activation bounds `act_bound`; learning them through a straight-through estimator
is LSQ (arXiv 1902.08153) in block-reconstruction form. AdaRound is not done: its
learned rounding would need a new stored tensor per weight and width.

* Blocks: registry layers grouped by module path prefix (`group_blocks`; depth 1
  for the UNet: each res block, attention block, and every top-level layer —
  `conv_in`, the time-embedding denses, down/upsamplers, `conv_out` — alone).
* Inputs: each block's float inputs and float output on the calibration set,
  captured in one float pass (`capture_blocks`), so blocks are independent and
  a genome mixing widths across blocks sees parameters fit for its own width.
* For every block and every width k (the whole block at k; the softmax operand of
  attention stays at its pinned width and is only learned in that width's run): Adam
  on log(bound) and log(clip ratio) (clip ratio kept <= 1), `steps` minibatch
  steps, starting from the min-MSE values, minimizing the block output MSE with
  `ste.py`'s fake-quant. The objective on the whole capture set is evaluated at
  a few snapshots along the run; the best is kept only if it is below the
  min-MSE one; otherwise the min-MSE value stays.
* The result carries no bias correction (`bias_correction.py`): those means
  depend on the ranges, so they are made again for the reconstructed ones
  (`tmpq calibrate --reconstruct` does).

Pure functions with explicit keys; the host loop over blocks x widths shows tqdm.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm

from tmpq_jax.errors import UserError
from tmpq_jax.quant import intercept, ops, ste
from tmpq_jax.quant.calibration import _batch_size
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QParams

STAGE_MIN_MSE = "min-mse"
STAGE_RECONSTRUCTION = "reconstruction"
DEFAULT_STEPS = 300
DEFAULT_LR = 2e-3  # on log(bound), log(ratio): ~0.2% a step
DEFAULT_BATCH = 32
DEFAULT_MAX_PAIRS = 256  # a random subset of the calibration pairs


@dataclasses.dataclass(frozen=True)
class Block:
    """A module of the model (path `prefix`) and the registry layers inside it."""

    prefix: tuple[str, ...]
    layers: tuple[int, ...]

    @property
    def name(self) -> str:
        return "/".join(self.prefix)


def group_blocks(registry: LayerRegistry, depth: int = 1) -> tuple[Block, ...]:
    """Registry layers grouped by the first `depth` entries of their module path,
    in forward order (a layer whose path is that short is a block of its own)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, layer in enumerate(registry):
        groups.setdefault(layer.path[:depth], []).append(i)
    return tuple(Block(p, tuple(ix)) for p, ix in groups.items())


def calibration_stage(meta: dict) -> str:
    """The stage that produced a saved calibration (`calibration.json`'s settings);
    files written before stages were recorded are min-MSE."""
    return (meta.get("settings") or {}).get("stage", STAGE_MIN_MSE)


# ----------------------------------------------------------------------------
# Capturing each block's float inputs and output.


def _block_interceptor(prefixes, hook):
    """Calls hook(prefix, module, args, output) for every call of a module whose
    path is one of `prefixes`."""
    wanted = set(prefixes)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path in wanted:
            if kwargs:
                raise NotImplementedError(f"block {path}: keyword arguments")
            hook(path, context.module, args, out)
        return out

    return interceptor


def block_modules(model: nn.Module, variables: Any, *args, blocks) -> dict:
    """{prefix: an unbound copy of the block's module}, applied on its own with
    {'params': params[prefix...]} (traced abstractly: costs no compute)."""
    found: dict = {}

    def hook(path, module, call_args, out):
        if path in found:
            raise NotImplementedError(f"block {'/'.join(path)} is called twice")
        found[path] = module.clone(parent=None, name=None)

    with nn.intercept_methods(_block_interceptor([b.prefix for b in blocks], hook)):
        jax.eval_shape(lambda v, *a: model.apply(v, *a), variables, *args)
    missing = [b.name for b in blocks if b.prefix not in found]
    if missing:
        raise UserError(f"blocks {missing[:3]} are not modules of the model.")
    return found


def capture_blocks(
    model: nn.Module,
    variables: Any,
    xs: jax.Array,
    ts: jax.Array,
    blocks: Sequence[Block],
    batch_size: int = 64,
) -> dict:
    """{prefix: (inputs tuple of f32[N, ...], output f32[N, ...])}: every block's
    float inputs and output over the calibration pairs (host numpy)."""
    prefixes = [b.prefix for b in blocks]

    @jax.jit
    def fn(v, x, t):
        got: dict = {}

        def hook(path, module, call_args, out):
            got[path] = (tuple(call_args), out)

        with nn.intercept_methods(_block_interceptor(prefixes, hook)):
            model.apply(v, x, t)
        return got

    n = int(xs.shape[0])
    b = _batch_size(n, batch_size)  # one compiled shape
    parts = [
        jax.device_get(fn(variables, xs[s : s + b], ts[s : s + b]))
        for s in range(0, n, b)
    ]
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


# ----------------------------------------------------------------------------
# A block's quantized forward through the STE.


def _ste_handler(prefix, registry, block_layers, theta, bits, pinned_bounds):
    """Quantizes the block's registry layers with `ste` fake-quant. theta:
    {'act': f32[n, 2] (left, right operand bounds), 'clip': (f32[C] | None, ...)}
    in block-layer order; `pinned_bounds` f32[n]: the left bound used where the
    layer pins its left operand to another width than `bits`."""
    where = {i: j for j, i in enumerate(block_layers)}

    def handler(call):
        site = dataclasses.replace(call.site, path=tuple(prefix) + call.site.path)
        i = registry.index_of_site(site)
        if i is None:
            return call.original()
        j = where.get(i)
        if j is None:
            raise UserError(f"layer {registry[i].name} is not in its block.")
        layer = registry[i]
        left_bits, left_bound = bits, theta["act"][j, 0]
        if layer.pinned_lhs_bits:
            left_bits = layer.pinned_lhs_bits
            left_bound = jnp.where(bits == left_bits, left_bound, pinned_bounds[j])
        if layer.kind == "matmul":
            right_q = lambda b: ste.fake_quant_activation(b, bits, theta["act"][j, 1])
        else:
            right_q = lambda w: ste.fake_quant_weight(w, bits, theta["clip"][j])
        float_op = ops.float_op(call)

        def op(a, b, *args, **kwargs):
            a = ste.fake_quant_activation(a, left_bits, left_bound)
            return float_op(a, right_q(b), *args, **kwargs)

        return ops.run(layer, call, op)

    return handler


def _subtree(params: Any, prefix: Sequence[str]) -> Any:
    for p in prefix:
        params = params[p]
    return params


def block_objective_fn(module, block: Block, registry: LayerRegistry, block_params):
    """(theta, inputs, target, bits, pinned_bounds) -> mean squared error of the
    block's quantized output against `target` (float output)."""
    variables = {"params": block_params}

    def objective(theta, inputs, target, bits, pinned_bounds):
        handler = _ste_handler(
            block.prefix, registry, block.layers, theta, bits, pinned_bounds
        )
        with intercept.intercept(handler):
            out = module.apply(variables, *inputs)
        return jnp.mean(jnp.square(out - target))

    return objective


# ----------------------------------------------------------------------------
# The optimisation of one block at one width.


def _theta(qparams: QParams, block: Block, k: int) -> dict:
    act = jnp.asarray(qparams.act_bound)[jnp.asarray(block.layers), :, k]
    clip = tuple(
        None if qparams.w_clip[i] is None else jnp.asarray(qparams.w_clip[i][k])
        for i in block.layers
    )
    return {"act": act, "clip": clip}


def _pinned_bounds(qparams: QParams, registry, block: Block) -> jax.Array:
    out = []
    for i in block.layers:
        p = registry[i].pinned_lhs_bits
        k = qparams.bit_widths.index(p) if p else 0
        out.append(qparams.act_bound[i, 0, k])
    return jnp.asarray(out, jnp.float32)


def make_block_fit(
    objective, steps: int, lr: float, batch_size: int, snapshots: int = 4
):
    """(theta0, inputs, target, bits, pinned, key) -> (thetas, losses f32[steps]):
    Adam (cosine-decayed `lr`) on log(theta) for `steps` minibatch steps (clip
    ratios kept <= 1); `thetas`: the parameters after every `steps // snapshots`
    steps (the last one included), for the caller to pick the best. One
    jitted step per host iteration. (A `lax.scan` over the steps ran ~10x slower
    per step on XLA:CPU than this loop; the minibatches are gathered on the host.)
    Minibatch s holds `batch_size` distinct pairs drawn with fold_in(key, s)."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    every = max(1, steps // max(1, snapshots))

    def loss(log_theta, inputs, target, bits, pinned):
        return objective(jax.tree.map(jnp.exp, log_theta), inputs, target, bits, pinned)

    @jax.jit
    def step(log_theta, opt_state, inputs, target, bits, pinned):
        value, g = jax.value_and_grad(loss)(log_theta, inputs, target, bits, pinned)
        updates, opt_state = opt.update(g, opt_state, log_theta)
        log_theta = optax.apply_updates(log_theta, updates)
        clip = tuple(
            None if c is None else jnp.minimum(c, 0.0) for c in log_theta["clip"]
        )
        return {"act": log_theta["act"], "clip": clip}, opt_state, value

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def batches(key, n, b):
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(steps))
        return jax.vmap(lambda k: jax.random.choice(k, n, (b,), replace=False))(keys)

    def fit(theta0, inputs, target, bits, pinned, key):
        inputs = jax.tree.map(np.asarray, inputs)  # a block may take (h, skip) parts
        target = np.asarray(target)
        n = target.shape[0]
        idx = np.asarray(batches(key, n, min(batch_size, n)))
        log_theta = jax.tree.map(jnp.log, theta0)
        opt_state = opt.init(log_theta)
        losses, thetas = [], []
        for s in range(steps):
            pick = idx[s]
            log_theta, opt_state, value = step(
                log_theta,
                opt_state,
                jax.tree.map(lambda a, p=pick: a[p], inputs),
                target[pick],
                bits,
                pinned,
            )
            losses.append(value)
            if (s + 1) % every == 0 or s + 1 == steps:
                thetas.append(jax.tree.map(jnp.exp, log_theta))
        return thetas, np.asarray(jnp.stack(losses))

    return fit


def make_block_eval(objective, batch_size: int):
    """Jitted (theta, inputs, target, bits, pinned) -> the objective on all pairs
    (mean over equal chunks of `batch_size`, or one chunk)."""

    @jax.jit
    def evaluate(theta, inputs, target, bits, pinned):
        n = target.shape[0]
        b = batch_size if n % batch_size == 0 else n
        chunk = lambda a: a.reshape(n // b, b, *a.shape[1:])
        per = lax.map(
            lambda io: objective(theta, io[0], io[1], bits, pinned),
            (jax.tree.map(chunk, inputs), chunk(target)),
        )
        return jnp.mean(per)

    return evaluate


# ----------------------------------------------------------------------------
# The whole stage.


def reconstruct(
    model: nn.Module,
    params: Any,
    registry: LayerRegistry,
    qparams: QParams,
    xs: jax.Array,
    ts: jax.Array,
    key: jax.Array,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    depth: int = 1,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    blocks: Sequence[Block] | None = None,
    progress: bool = False,
) -> tuple[QParams, dict]:
    """Block reconstruction of `qparams` (the min-MSE stage's) for
    `model.apply({'params': params}, x, t)` on calibration pairs (xs, ts) (at most
    `max_pairs` of them, a random subset), every width of `qparams.bit_widths`, for
    `blocks` (default: `group_blocks(registry, depth)`). `key` draws the subset and
    the minibatches. Returns the new
    QParams (same shapes) and info: per block and width the objective before and
    after and which one was kept."""
    if qparams.act_bound is None or qparams.w_clip is None:
        raise UserError("reconstruction starts from a complete min-MSE calibration.")
    if steps < 1:
        raise UserError(f"reconstruction steps {steps}: use at least 1.")
    start = time.perf_counter()
    blocks = tuple(blocks) if blocks is not None else group_blocks(registry, depth)
    variables = {"params": params}
    k_subset, k_fit = jax.random.split(key)
    n = int(xs.shape[0])
    if max_pairs is not None and n > max_pairs:  # host memory: ~3 MB a pair at 28x28
        pick = np.sort(
            np.asarray(jax.random.choice(k_subset, n, (max_pairs,), replace=False))
        )
        xs, ts = xs[pick], ts[pick]
    modules = block_modules(model, variables, xs[:1], ts[:1], blocks=blocks)
    captured = capture_blocks(model, variables, xs, ts, blocks)
    act_bound = np.array(qparams.act_bound, np.float32)
    w_clip = [None if c is None else np.array(c, np.float32) for c in qparams.w_clip]
    rows = []
    work = [(b, k) for b in blocks for k in range(len(qparams.bit_widths))]
    bar = tqdm(total=len(work), disable=not progress, desc="reconstruct", unit="fit")
    for bi, block in enumerate(blocks):
        objective = block_objective_fn(
            modules[block.prefix], block, registry, _subtree(params, block.prefix)
        )
        fit = make_block_fit(objective, steps, lr, batch_size)
        evaluate = make_block_eval(objective, batch_size)
        inputs, target = captured[block.prefix]
        pinned = _pinned_bounds(qparams, registry, block)
        for k, width in enumerate(qparams.bit_widths):
            bits = jnp.int32(width)
            theta0 = _theta(qparams, block, k)
            thetas, losses = fit(
                theta0,
                inputs,
                target,
                bits,
                pinned,
                jax.random.fold_in(jax.random.fold_in(k_fit, bi), k),
            )
            before = float(evaluate(theta0, inputs, target, bits, pinned))
            scores = [
                float(evaluate(th, inputs, target, bits, pinned)) for th in thetas
            ]
            best = int(np.argmin(scores))
            theta, after = thetas[best], scores[best]
            keep = after < before
            if keep:
                for j, i in enumerate(block.layers):
                    act_bound[i, :, k] = np.asarray(theta["act"][j])
                    if w_clip[i] is not None:
                        w_clip[i][k] = np.asarray(theta["clip"][j])
            rows.append(
                dict(
                    block=block.name,
                    width=int(width),
                    mse_min_mse=before,
                    mse_reconstruction=after,
                    kept=STAGE_RECONSTRUCTION if keep else STAGE_MIN_MSE,
                    best_snapshot=best,
                    loss_first=float(losses[0]),
                    loss_last=float(losses[-1]),
                )
            )
            bar.set_postfix(
                block=block.name,
                w=int(width),
                gain=f"{before / max(after, 1e-30):.2f}x",
            )
            bar.update()
    bar.close()
    new = QParams(  # no bias correction: it was made for the old ranges
        qparams.bit_widths,
        jnp.asarray(act_bound),
        tuple(None if c is None else jnp.asarray(c) for c in w_clip),
    )
    info = dict(
        stage=STAGE_RECONSTRUCTION,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        depth=depth,
        num_pairs=int(xs.shape[0]),
        blocks_fit=len(blocks),
        fits=rows,
        seconds=time.perf_counter() - start,
    )
    return new, info
