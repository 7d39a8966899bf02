"""Qwix (0.1.8) against the AQT supernet, on the CPU: can Qwix take traced bits,
how often does it compile, and how far is a Qwix-served genome from SERVE.

1. Traced bits: a Qwix qtype (`jnp.int8`, `"int6"`) is a Python value the
   library branches on; we try to quantize with the width as a traced array.
2. Compiles: one small conv/dense model, `GENOMES` genomes, each run under one
   `jax.jit`: AQT's traced-bit supernet (`quantized_apply`, bits as arrays)
   against Qwix PTQ (one rule set per genome), counting traces and timing.
3. `--unet`: the shipped UNet with its shipped calibration, uniform W8A8..W5A5
   (attention q.k at the same width, p.v's value at 8: what Qwix can serve), on
   8 noised test images: |Qwix - SERVE| and, beside it, |SERVE - float| and
   |Qwix - float| (the rows of `benchmarks/qwix_export.py`).

    python -m benchmarks.experiments.qwix_supernet [--unet]

GPU speed is not measured here. Writes benchmarks/results/qwix_supernet_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.quant import QuantBits, build_registry, quantized_apply
from tmpq_jax.quant import qwix_export as qx

OUT = Path(__file__).resolve().parents[1] / "results" / "qwix_supernet_cpu.json"
GENOMES = 4


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        del t
        h = nn.relu(nn.Conv(16, (3, 3), name="c0")(x))
        h = nn.relu(nn.Conv(16, (3, 3), name="c1")(h))
        h = nn.Dense(16, name="d0")(h)
        return nn.Conv(1, (3, 3), name="c2")(h)


def traced_bits() -> dict:
    import qwix

    x = jnp.linspace(-1.0, 1.0, 64)

    def f(bits):
        return qwix.quantize(x, f"int{bits}", calibration_method="absmax").qvalue

    try:
        jax.jit(f)(jnp.int32(6))
        return {"traced_bits": True}
    except Exception as e:  # the answer is the exception
        line = str(e).strip().splitlines()[0][:160]
        return {"traced_bits": False, "error": f"{type(e).__name__}: {line}"}


def compiles() -> dict:
    import qwix

    model = Net()
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 1))
    t = jnp.zeros((8,), jnp.int32)
    variables = model.init(jax.random.key(1), x, t)
    reg = build_registry(model, variables, x, t)
    rng = np.random.default_rng(0)
    genomes = [
        QuantBits(*(jnp.asarray(rng.choice([8, 7, 6, 5], len(reg)), jnp.int32),) * 2)
        for _ in range(GENOMES)
    ]
    out = {}
    traces = [0]

    def aqt(bits):
        traces[0] += 1
        return quantized_apply(model, variables, x, t, bits=bits, registry=reg)

    fn, t0 = jax.jit(aqt), time.perf_counter()
    for g in genomes:
        fn(g).block_until_ready()
    out["aqt_traced_bits"] = dict(
        genomes=GENOMES, traces=traces[0], seconds=round(time.perf_counter() - t0, 2)
    )
    traces[0], t0 = 0, time.perf_counter()
    for g in genomes:  # what a search would do with Qwix: rules per genome
        rules = [
            qwix.QuantizationRule(
                module_path=re.escape(layer.name),
                weight_qtype=qx.qtype(qx.qtype_name(int(g.a_bits[i]))),
                act_qtype=qx.qtype(qx.qtype_name(int(g.a_bits[i]))),
            )
            for i, layer in enumerate(reg)
        ]
        qm = qwix.quantize_model(model, qwix.PtqProvider(rules))
        qv = qm.init(jax.random.key(1), x, t)

        def served(v, qm=qm):
            traces[0] += 1
            return qm.apply(v, x, t)

        jax.jit(served)(qv).block_until_ready()
    out["qwix_ptq"] = dict(
        genomes=GENOMES, traces=traces[0], seconds=round(time.perf_counter() - t0, 2)
    )
    return out


def unet_errors() -> list[dict]:
    """The shipped UNet with its shipped calibration: `benchmarks/qwix_export.py`'s
    rows (8 noised test images), errors only."""
    from benchmarks.qwix_export import compare, load, noised_batch
    from tmpq_jax.serving import SHIPPED_CALIBRATION

    lm, reg, qp, cands = load("unet", (), str(SHIPPED_CALIBRATION))
    args, _ = noised_batch(lm, 8)
    rows = []
    for b in (8, 7, 6, 5):
        row = compare(lm.model, lm.params, reg, qp, cands, args, b, b, repeats=0)
        rows.append(dict(model="fmnist_unet", **row))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet", action="store_true", help="also the shipped UNet's errors")
    args = p.parse_args(argv)
    result = dict(traced_bits=traced_bits(), compiles=compiles())
    print(json.dumps(result, indent=2), flush=True)
    if args.unet:
        result["unet"] = unet_errors()
    import qwix

    result.update(
        device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        jax=jax.__version__,
        qwix=qwix.__version__,
        date=datetime.date.today().isoformat(),
        command="python -m benchmarks.experiments.qwix_supernet"
        + (" --unet" if args.unet else ""),
    )
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
