"""Issue 26, part 4 (for `benchmarks.perf_big`): a big model served int8 (AQT
CONVERT + SERVE) and fp8 e4m3 where the GPU has it, against bf16, at one batch."""

import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from tmpq_jax.quant import export, intercept, ops
from tmpq_jax.quant.supernet import QuantBits

E4M3 = jnp.float8_e4m3fn


def median_time(fn, *args, repeats: int) -> float:
    """Median wall seconds of `fn(*args)` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fp8_supported(device) -> str | None:
    """None where `device` multiplies fp8 (an NVIDIA GPU of compute capability 8.9 or
    more); else why not."""
    cc = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and cc and float(cc) >= 8.9:
        return None
    return f"{device.device_kind} (compute capability {cc or 'none'}) has no fp8 (e4m3) matmuls; they need 8.9+ (Ada, Hopper): serve int8"


def fp8_convert(params, reg):
    """Dense kernels to e4m3 with a per-output-channel scale: (params, {i: scale})."""
    params, scales = export._copy(params), {}
    for i, layer in enumerate(reg):
        if layer.kind != "dense" or layer.param_path is None:
            continue
        node = export._get(params, layer.param_path[:-1])
        w = node[layer.param_path[-1]]
        amax = jnp.max(jnp.abs(w), axis=tuple(layer.weight_contracting))
        scales[str(i)] = jnp.maximum(amax, 1e-12) / 448.0
        node[layer.param_path[-1]] = (w / scales[str(i)]).astype(E4M3)
    return params, scales


def fp8_apply(model, reg, w, x, t, *y):
    """The model with each fp8 dense layer as an e4m3 x e4m3 gemm (activation scaled
    per tensor by its absmax), the rest as it is."""
    params, scales = w

    def handler(call):
        i = reg.index_of_site(call.site)
        if i is None or str(i) not in scales:
            return call.original()

        def op(a, k, dn):
            s = jnp.maximum(jnp.max(jnp.abs(a)).astype(jnp.float32), 1e-12) / 448.0
            q = (a.astype(jnp.float32) / s).astype(E4M3)
            out = lax.dot_general(q, k.astype(E4M3), dn, preferred_element_type=jnp.float32)
            return (out * (s * scales[str(i)])).astype(a.dtype)
        return ops.run(reg[i], call, op)

    with intercept.intercept(handler):
        return model.apply({"params": params}, x, t, *y)


def serving_modes(m, fp, fp8_off: str | None) -> dict:
    """name -> (jitted sampler, its weights): bf16, the uniform W8A8 genome served
    int8 (`export.convert` + `serve_apply`), and fp8 e4m3 unless `fp8_off` says why."""
    if not hasattr(m, "modes"):
        qm = export.convert(m.params, m.reg, QuantBits.uniform(m.reg, 8, 8), None, m.space.candidates)
        serve_int8 = lambda q, *x: export.serve_apply(m.model, q, *x, registry=m.reg)  # noqa: E731
        m.modes = dict(bf16=(fp, m.bf16), int8_w8a8=(m.sampler_fn(serve_int8), qm))
        if fp8_off is None:
            w8 = jax.jit(fp8_convert, static_argnums=1)(m.params, m.reg)
            m.modes["fp8_e4m3"] = (m.sampler_fn(lambda w, *x: fp8_apply(m.model, m.reg, w, *x)), w8)
    return m.modes


def serve(m, a, fp, fp8_off: str | None, batch: int) -> dict:
    """Each serving mode's images/s at `batch` (S: the throughput), N steps; at batch 1
    that is one image's latency (`latency_s`)."""
    x, y = m.noise[:batch], None if m.labels is None else m.labels[:batch]
    out = dict(batch=batch, steps=a.steps, genome="uniform W8A8")
    for name, (fn, w) in serving_modes(m, fp, fp8_off).items():
        try:
            t = median_time(fn, w, x, y, repeats=a.repeats)
            out[name] = dict(images_per_s=batch / t, latency_s=t)
        except Exception as e:  # noqa: BLE001 - recorded, the other modes go on
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        print(name, out.get(name), flush=True)
    return out
