"""How much of a model's compute the supernet quantizes: one row per model.

The shipped UNet, the Linen DiT (stock `nn.MultiHeadDotProductAttention`) and its
NNX twin, at their default sizes: quantized MACs, all matmul/conv MACs of one
forward (per sample), the coverage, and uniform W8A8's BitOPs per sample and step.
Traced abstractly: the CPU gives the same figures as any device.

    python -m benchmarks.byo_coverage
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import provenance, write_json
from tmpq_jax.models.dit import DiT, DiTConfig
from tmpq_jax.models.dit_nnx import DiTNNX
from tmpq_jax.models.nnx_model import NNXModel
from tmpq_jax.quant import QuantBits, build_registry
from tmpq_jax.quant.cost import bitops_per_step
from tmpq_jax.sampling import load_model


def _row(name: str, reg) -> dict:
    q = float(reg.macs.sum())
    w8a8 = float(bitops_per_step(QuantBits.uniform(reg, 8, 8), reg))
    return {"model": name, "layers": len(reg), "quantized_macs": q,
            "total_macs": q + reg.float_macs, "coverage": reg.coverage,
            "float_ops": [op.name for op in reg.float_ops], "bitops_w8a8": w8a8}  # fmt: skip


def rows() -> list[dict]:
    out = [_row("unet (shipped)", load_model().layer_registry(check=False))]
    cfg, spec = DiTConfig(), jax.ShapeDtypeStruct
    x = spec((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    args = (x, spec((1,), jnp.float32), spec((1,), jnp.int32))  # x, t, label
    model = DiT(cfg)
    variables = jax.eval_shape(model.init, jax.random.key(0), *args)
    out.append(_row("dit (linen)", build_registry(model, variables, *args)))
    nnx_model = NNXModel(DiTNNX(cfg, rngs=nnx.Rngs(0)))
    reg = build_registry(nnx_model, {"params": nnx_model.params}, *args)
    out.append(_row("dit (nnx)", reg))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="byo_coverage.json")
    args = p.parse_args(argv)
    payload = {**provenance(), "rows": rows()}
    for r in payload["rows"]:
        macs = f"{r['quantized_macs'] / 1e6:8.2f} of {r['total_macs'] / 1e6:8.2f} MMACs"
        print(
            f"{r['model']:16s} {r['layers']:3d} ops  coverage {100 * r['coverage']:.2f}%  {macs}"
        )
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
