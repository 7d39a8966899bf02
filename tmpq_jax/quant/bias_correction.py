"""Bias correction: the mean output error of every quantized layer, removed.

Rounding a layer's kernel and input to few bits leaves an error whose *mean* over
the data is not zero: per output channel, E[y_q - y] != 0. Through a DDIM
trajectory a zero-mean error mostly averages out, a mean error does not: on the
shipped model uniform W7A7 predicts eps 0.02 too low on average, every x0
prediction is brightened and the black background turns grey
(`benchmarks/experiments/quant_bias.py`). Removing that mean is bias correction
(Nagel et al. 2019, "Data-Free Quantization", sec. 4.2; for diffusion models PTQD,
arXiv 2305.10657, corrects the same mean at the model's output).

Here it is per layer, so it composes over mixed-precision genomes: for every
conv/dense, every weight width k and activation width j, the mean over the
calibration set (every position and sample) of the layer's quantized output minus
its float output, both from the *float* model's input to that layer. That is
`QParams.bias_corr` (float32[K, K, C_out]); the supernet and SERVE subtract the
entry at the genome's widths from the layer's output, before its bias. A genome
still only selects: nothing is recomputed per candidate.

Opt-in (`tmpq calibrate --bias-correction`): on the shipped model (H100, 10k
samples, 10 quad steps) it takes uniform W8A8 from FID 12.71 to 11.16 (full
precision 10.77) and W7A7 from 75.7 to 22.0, but the W6A6 joint search ended at
4.69 with it against 3.52 without (seed 0; docs/results.md, "Uniform precision").

One compiled program: the float model with every conv/dense run twice (float,
and quantized at traced uniform widths (k, j)), called for the K*K width pairs
and every batch of the calibration set.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tmpq_jax.quant import intercept, numerics, ops
from tmpq_jax.quant.calibration import _batch_size
from tmpq_jax.quant.registry import LayerRegistry
from tmpq_jax.quant.supernet import QParams, QuantBits, operand_specs, with_kernel


def _error_fn(model, registry: LayerRegistry, qparams: QParams):
    """Jitted (variables, x, t, w_bits[L], a_bits[L]) -> {layer: f32[C_out]}: the
    mean quantized-minus-float output of every conv/dense on its float input."""
    uncorrected = qparams.replace(bias_corr=None)

    def fn(variables, x, t, w_bits, a_bits):
        bits = QuantBits(w_bits, a_bits)
        errors: dict[int, list[jax.Array]] = {}

        def record(call):
            out = call.original()  # the next layer sees float inputs
            i = registry.index_of_site(call.site)
            if i is None or registry[i].kind == "matmul":
                return out
            layer = registry[i]
            left, right = operand_specs(i, registry, bits, uncorrected)
            if call.prim == "conv":
                quant = numerics.conv_general_dilated(left, right)
            else:
                quant = numerics.dot_general(left, right)
            stored = with_kernel(i, registry, call, bits, uncorrected)  # e.g. GPTQ
            diff = ops.run_canonical(layer, stored, quant) - ops.run_canonical(
                layer, call, ops.float_op(call)
            )
            diff = diff.astype(jnp.float32).reshape(-1, layer.channels)
            errors.setdefault(i, []).append(jnp.mean(diff, axis=0))
            return out

        with intercept.intercept(record):
            model.apply(variables, x, t)
        return {i: jnp.mean(jnp.stack(v), axis=0) for i, v in errors.items()}

    return jax.jit(fn)


def bias_corrections(
    model: nn.Module,
    params: Any,
    registry: LayerRegistry,
    qparams: QParams,
    xs: jax.Array,
    ts: jax.Array,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[jax.Array | None, ...]:
    """`QParams.bias_corr` for `qparams` (its clip ratios and activation bounds;
    any existing correction ignored) on the calibration inputs (xs, ts): per
    layer float32[K, K, C_out] over `qparams.bit_widths` (None for MatMuls)."""
    n = int(xs.shape[0])
    b = _batch_size(n, batch_size)
    fn = _error_fn(model, registry, qparams)
    widths = qparams.bit_widths
    k = len(widths)
    sums = {
        i: np.zeros((k, k, layer.channels), np.float64)
        for i, layer in enumerate(registry)
        if layer.kernel_shape
    }
    pairs = [(kw, ka) for kw in range(k) for ka in range(k)]
    bar = tqdm(
        total=len(pairs) * (n // b),
        disable=not progress,
        desc="calibrate: bias correction",
    )
    L = len(registry)
    for kw, ka in pairs:
        w_bits = jnp.full((L,), widths[kw], jnp.int32)
        a_bits = jnp.full((L,), widths[ka], jnp.int32)
        for s in range(n // b):
            out = fn(
                {"params": params},
                xs[s * b : (s + 1) * b],
                ts[s * b : (s + 1) * b],
                w_bits,
                a_bits,
            )
            for i, e in jax.device_get(out).items():
                sums[i][kw, ka] += e
            bar.update()
    bar.close()
    missing = sorted(set(sums) - set(out))
    if missing:
        raise AssertionError(f"layers {missing} were never called")
    return tuple(
        jnp.asarray(sums[i] / (n // b), jnp.float32) if i in sums else None
        for i in range(L)
    )
