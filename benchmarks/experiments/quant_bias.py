"""Why uniform W7A7 samples worse than W6A6: the mean of the quantization error.

Along the float model's own 10-step quad DDIM trajectories (held-out noise), each
uniform width's eps prediction is compared with the float one at every step:
relative RMS error, and the *mean* error (bias) over pixels and samples. A random,
zero-mean error mostly averages out over the steps; a bias does not: a negative
eps bias brightens every x0 prediction (the black Fashion-MNIST background turns
grey, which FID punishes), a positive one darkens it (clipped at -1, nearly free).

With a bias-corrected calibration (`bias_correction.py`) every width is measured
twice, without and with the stored corrections (`bias_corrected` in each row).

  python -m benchmarks.experiments.quant_bias [--samples 64] [--calibration DIR]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import provenance, write_json
from tmpq_jax.diffusion.schedules import quad_timesteps
from tmpq_jax.quant.calibration_io import load_calibration, read_calibration_meta
from tmpq_jax.quant.registry import unet_registry
from tmpq_jax.quant.supernet import QuantBits, quantized_apply
from tmpq_jax.sampling import load_model
from tmpq_jax.serving import SHIPPED_CALIBRATION


def float_states(lm, x, timesteps):
    """(x_t, t) along the float DDIM trajectory from x, highest t first."""
    ab = lm.sched.alphas_cumprod
    eps = jax.jit(lambda x, t: lm.model.apply({"params": lm.params}, x, t))
    ts = list(timesteps[::-1])
    states = []
    for i, t in enumerate(ts):
        states.append((x, int(t)))
        e = eps(x, jnp.full((x.shape[0],), t))
        a, a_prev = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        x0 = (x - jnp.sqrt(1 - a) * e) / jnp.sqrt(a)
        x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * e
    return states, eps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--calibration", default=str(SHIPPED_CALIBRATION))
    ap.add_argument("--out", default="quant_bias_cpu.json")
    a = ap.parse_args(argv)
    lm = load_model(None)
    reg = unet_registry(lm.config)
    cands = tuple(read_calibration_meta(a.calibration)["candidates"])
    qp, _ = load_calibration(a.calibration, reg, cands)
    x = jax.random.normal(jax.random.key(1), (a.samples, 28, 28, 1))
    states, eps_fp = float_states(lm, x, quad_timesteps(10))
    ab = np.asarray(lm.sched.alphas_cumprod)
    rows = []
    variants = [(False, qp.replace(bias_corr=None))]
    if qp.bias_corr is not None:
        variants.append((True, qp))
    eps_q = jax.jit(  # bits and calibration traced: one compile per structure
        lambda x, t, bits, q: quantized_apply(
            lm.model,
            {"params": lm.params},
            x,
            t,
            bits=bits,
            registry=reg,
            qparams=q,
            candidates=cands,
        )
    )
    for b, (corrected, q) in itertools.product(cands, variants):
        bits = QuantBits.uniform(reg, b, b)
        for xt, t in states:
            tt = jnp.full((xt.shape[0],), t)
            ef, eq = eps_fp(xt, tt), eps_q(xt, tt, bits, q)
            d = np.asarray(eq - ef, np.float64)
            rel = float(np.sqrt((d**2).mean() / (np.asarray(ef) ** 2).mean()))
            bias = float(d.mean())
            # the x0 prediction moves by -sqrt(1 - a) / sqrt(a) * eps error
            x0_shift = float(-np.sqrt((1 - ab[t]) / ab[t]) * bias)
            rows.append(
                dict(
                    bits=f"W{b}A{b}",
                    bias_corrected=corrected,
                    t=t,
                    rel_rms=rel,
                    mean_error=bias,
                    x0_mean_shift=x0_shift,
                )
            )
            print(rows[-1], flush=True)
    write_json(
        a.out,
        dict(provenance(), calibration=a.calibration, samples=a.samples, rows=rows),
    )


if __name__ == "__main__":
    main()
