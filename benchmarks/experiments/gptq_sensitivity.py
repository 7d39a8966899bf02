"""Which layers make W4A8 bad: the one-step error of a calibration, per layer.

  python -m benchmarks.experiments.gptq_sensitivity CALIB_DIR [CALIB_DIR ...]
      [--per-layer] [--samples 16] [--out quant_gptq_sensitivity_cpu.json]

Held-out inputs: x_t of the float model's own DDIM trajectories on the 10 quad
steps (`--samples` noises of seed 1234, not the calibration's). For each input,
one DDIM step with the quantized eps against the float one: the RMS of the
x_prev difference in 8-bit gray levels (2/255), over all steps and per step.
Rows: uniform W8A8 and W4A8; `--per-layer`: each conv/dense alone at W4 (the rest
W8A8) and all at W4A8 but that one at W8; else only conv_in and conv_out.
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import provenance, write_json
from tmpq_jax.diffusion.samplers import ddim_step
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.quant import QuantBits, quantized_apply, unet_registry
from tmpq_jax.quant.calibration import _trajectories, model_fingerprint
from tmpq_jax.quant.calibration_io import load_calibration
from tmpq_jax.sampling import load_model

GRAY = 2.0 / 255.0
SEED = 1234


def step_error_fn(lm, reg, cands, samples: int):
    """Jitted (qparams, w_bits, a_bits) -> (RMS gray levels, per step)."""
    ts = jnp.asarray(
        timestep_schedule("quad", 10, lm.diffusion.num_timesteps), jnp.int32
    )
    xs, tt = _trajectories(
        lm.model, lm.params, lm.sched, ts, lm.noise(jax.random.key(SEED), samples)
    )
    t_prev = jnp.concatenate([jnp.array([-1], jnp.int32), ts[:-1]])[::-1]
    ab = lambda t: jnp.where(t >= 0, lm.sched.alphas_cumprod[jnp.maximum(t, 0)], 1.0)
    x, t = xs.reshape(-1, *xs.shape[2:]), tt.reshape(-1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    a_t = jnp.repeat(ab(ts[::-1]), samples).reshape(shape)
    a_p = jnp.repeat(ab(t_prev), samples).reshape(shape)
    step = lambda x, e, a_t, a_p: ddim_step(x, e, a_t, a_p, 0.0, jnp.zeros_like(x))
    data = (x, t, a_t, a_p)
    ref = step(x, lm.model.apply({"params": lm.params}, x, t), a_t, a_p)

    @jax.jit  # the data are arguments: as constants XLA would fold the float model
    def fn(params, qp, w, a, data, ref):
        x, t, a_t, a_p = data
        kw = dict(bits=QuantBits(w, a), registry=reg, qparams=qp, candidates=cands)
        e = quantized_apply(lm.model, {"params": params}, x, t, **kw)
        d = (step(x, e, a_t, a_p) - ref) / GRAY
        per = jnp.sqrt(jnp.mean(d.reshape(len(ts), samples, -1) ** 2, axis=(1, 2)))
        return jnp.sqrt(jnp.mean(d**2)), per

    run = lambda qp, w, a: fn(lm.params, qp, w, a, data, ref)
    return lambda qp, w, a: tuple(np.asarray(v) for v in run(qp, w, a)), [
        int(v) for v in ts[::-1]
    ]


def measure(path, lm, reg, fn, per_layer: bool) -> dict:
    qp, meta = load_calibration(
        path, reg, tuple(meta_cands(path)), model_fingerprint(lm.card)
    )
    bits = lambda w: np.asarray(QuantBits.uniform(reg, w, 8).w_bits)
    a8, w4, w8 = np.asarray(QuantBits.uniform(reg, 8, 8).a_bits), bits(4), bits(8)
    out = {"path": str(path), "method": meta["settings"].get("method", "minmse")}
    for name, w in (("W8A8", w8), ("W4A8", w4)):
        e, per = fn(qp, w, a8)
        out[name] = {"rms_gray": float(e), "per_step": np.round(per, 3).tolist()}
    names = [ly.name for ly in reg if ly.kind != "matmul"]
    rows = []
    for name in names if per_layer else ["conv_in", "conv_out"]:
        i = reg.index(name)
        only, but = w8.copy(), w4.copy()
        only[i], but[i] = 4, 8
        rows.append(dict(layer=name, only_w4=float(fn(qp, only, a8)[0]),
                         all_w4_but_this=float(fn(qp, but, a8)[0])))  # fmt: skip
        print(path, rows[-1], flush=True)
    return out | {"layers": rows}


def meta_cands(path) -> list[int]:
    return json.loads((Path(path) / "calibration.json").read_text())["candidates"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("calibrations", nargs="+")
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", default="quant_gptq_sensitivity_cpu.json")
    args = ap.parse_args()
    lm = load_model(None)
    reg = unet_registry(lm.config)
    fn, steps = step_error_fn(
        lm, reg, tuple(meta_cands(args.calibrations[0])), args.samples
    )
    rows = [measure(p, lm, reg, fn, args.per_layer) for p in args.calibrations]
    head = {"what": __doc__.split("\n\n")[1], "steps": steps, "samples": args.samples}
    print(write_json(args.out, provenance() | head | {"calibrations": rows}))


if __name__ == "__main__":
    main()
