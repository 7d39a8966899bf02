"""Is XLA's int8 attention dot right when run op by op (issue 23's gptaq fault)?

    python -m benchmarks.experiments.int8_eager_attention [--out-dir DIR]

The gptaq pass runs the model with jit off (the interceptor), so each AQT int8
dot_general is compiled on its own. On an H100 the pass's attention output went
wrong (the `proj` layers after it were compensated for an error evaluation never
sees: `calibration_diff_gptaq_cpu_gpu.json`). This runs the shipped UNet's two
attention einsums at its shapes (batch 64, 7x7 tokens, one head of 64; and a
DiT-like 196 tokens x 4 heads) through `ops.quantized` eagerly and under jit, and
through `ops.quantized_in_float` under jit, and reports each one's largest
difference from the eager float fake-quant result, relative to the result's
absmax. One integer step of a value is about 1/127 of the bound. Writes DIR/int8_eager_attention.json.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import provenance, write_json
from tmpq_jax.models.ops import MatMul
from tmpq_jax.quant import build_registry, intercept, numerics, ops


class Einsum(nn.Module):
    equation: str

    @nn.compact
    def __call__(self, a, b):
        return MatMul(self.equation, name="mm")(a, b)


def _errors(equation, a, b) -> dict:
    """Each way's largest difference from the eager float fake-quant result, over
    the result's absmax (the operands are given: no softmax in between)."""
    model = Einsum(equation)
    variables = model.init(jax.random.key(2), a, b)
    reg = build_registry(model, variables, a, b)
    specs = (
        numerics.ActQuant(8, jnp.float32(1.0)),
        numerics.ActQuant(8, jnp.float32(4.0)),
    )

    def run(quantize):
        def handler(call):
            return quantize(reg[reg.index_of_site(call.site)], call, *specs)

        def fn(a, b):
            with intercept.intercept(handler):
                return model.apply(variables, a, b)

        return fn

    ref = run(ops.quantized_in_float)(a, b)  # eager: jit is off under the interceptor
    rel = lambda out: float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    return dict(
        int8_eager=rel(run(ops.quantized)(a, b)),
        int8_jit=rel(jax.jit(run(ops.quantized))(a, b)),
        float_jit=rel(jax.jit(run(ops.quantized_in_float))(a, b)),
    )


def measure(batch: int, tokens: int, heads: int, dim: int) -> dict:
    shape = (batch, tokens, heads, dim)
    q, k = (jax.random.uniform(jax.random.key(s), shape, minval=-1) for s in (0, 1))
    logits = jax.random.normal(jax.random.key(3), (batch, heads, tokens, tokens))
    probs = jax.nn.softmax(logits)
    return dict(
        shape=dict(batch=batch, tokens=tokens, heads=heads, dim=dim),
        qk=_errors("blhd,bmhd->bhlm", q, k),
        av=_errors("bhlm,bmhd->blhd", probs, k),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir")
    ap.add_argument(
        "--shapes",
        default="64x49x1x64,64x196x4x64",
        help="batch x tokens x heads x dim, comma-separated (the UNet's 7x7 attention "
        "and a DiT-like one; 64x48x1x64,64x52x1x64,64x196x1x64 test alignment)",
    )
    args = ap.parse_args()
    rows = [measure(*map(int, s.split("x"))) for s in args.shapes.split(",")]
    for r in rows:
        print(r)
    print(
        write_json(
            "int8_eager_attention.json", provenance() | dict(rows=rows), args.out_dir
        )
    )


if __name__ == "__main__":
    main()
