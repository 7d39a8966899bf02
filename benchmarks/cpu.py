"""Training steps on XLA's CPU backend: the step loop against a plain `jax.jit` step.

`tmpq train` used to run its `steps_per_call` steps in one jitted `lax.scan`
(`loop="scan"`, "before"): on XLA:CPU a UNet step ~10x slower than the step jitted
alone, as convolutions get the fast (Eigen) kernels' layout only outside loop bodies
(the HLO shows `f01b_i01o->01bf` convolutions in the scan, `b01f_01io->b01f` in the
plain jit). The UNet's CPU default is now n jitted steps called from Python
(`loop="python"`, "after"); the DiT's flow steps keep the scan, faster on CPU.

  JAX_PLATFORMS=cpu python -m benchmarks.cpu [--repeats 5] [--steps 2] [--no-dit]

Times the UNet (ch 16, batch 32) and the DiT of configs/fmnist_dit.py each way,
interleaved round by round (medians over --repeats). Writes results/cpu.json.
"""

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import REPO, add_args, load_result, provenance, write_json
from tmpq_jax.config import TrainConfig, load_config
from tmpq_jax.diffusion.flow import FlowConfig, flow_loss
from tmpq_jax.diffusion.schedules import DiffusionConfig, make_noise_schedule
from tmpq_jax.models.dit import DiT, DiTConfig
from tmpq_jax.models.unet import UNet, UNetConfig
from tmpq_jax.train import step as st

NUM_IMAGES = 60_000  # Fashion-MNIST's train split: the dataset lies on the device
DIT_CONFIG = str(REPO / "configs" / "fmnist_dit.py")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    key = "Model name:"
    names = [s[len(key) :].strip() for s in out.splitlines() if s.startswith(key)]
    return names[0] if names else platform.processor() or "unknown"


def _plain_step(loss_fn, cfg: TrainConfig):
    """A plain jitted step (no loop), written from the library's public pieces."""
    tx = st.make_optimizer(cfg)

    @functools.partial(jax.jit, donate_argnums=0)  # as the library's steps
    def step(state, images, labels, key):
        k_idx, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
        x0 = images[idx].astype(jnp.float32) / 127.5 - 1.0
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x0, labels[idx], k_loss)
        return st._apply_grads(state, grads, tx, cfg), loss

    def steps(state, images, labels, key, n):
        losses = []
        for _ in range(n):
            state, loss = step(state, images, labels, key)
            losses.append(loss)
        return state, losses

    return steps


def _model(name: str, batch: int):
    """-> model config, {variant: fn(state, images, labels, key, n)}, TrainConfig."""
    tc = TrainConfig(batch_size=batch)
    if name == "unet":
        mcfg = UNetConfig(ch=16)
        model, sched = UNet(mcfg), make_noise_schedule(DiffusionConfig())
        loss_fn = lambda p, x0, y, k: st.ddpm_loss(p, model, sched, x0, k)
        wrap = lambda fn: lambda s, im, lab, k, n: fn(s, im, k, n)  # no labels
        make = lambda loop: wrap(st.make_train_steps(model, sched, tc, loop=loop))
    else:
        c = load_config(DIT_CONFIG)
        mcfg = DiTConfig.from_dict(c.model.to_dict())
        model, flow = DiT(mcfg), FlowConfig.from_dict(c.flow.to_dict())
        null = mcfg.null_label
        loss_fn = lambda p, x0, y, k: flow_loss(p, model, flow, x0, y, k, null)
        make = lambda loop: st.make_flow_train_steps(model, flow, tc, loop=loop)
    fns = {loop: make(loop) for loop in ("scan", "python")}
    return mcfg, {"plain_jit": _plain_step(loss_fn, tc), **fns}, tc


def bench(name: str, batch: int, steps: int, repeats: int) -> dict:
    mcfg, fns, tc = _model(name, batch)
    rng = np.random.default_rng(0)
    shape = (NUM_IMAGES, mcfg.image_size, mcfg.image_size, mcfg.channels)
    images = jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 10, NUM_IMAGES, dtype=np.int32))
    key = jax.random.key(0)
    states = {v: st.create_train_state(jax.random.key(1), mcfg, tc) for v in fns}
    compile_s, samples = {}, {v: [] for v in fns}

    def call(v):
        t0 = time.perf_counter()
        states[v], losses = fns[v](states[v], images, labels, key, steps)
        jax.block_until_ready((states[v], losses))
        return time.perf_counter() - t0

    for v in fns:  # first call: compiles (and runs `steps` steps)
        compile_s[v] = round(call(v), 2)
        print(f"{name} {v}: first call {compile_s[v]} s", flush=True)
    for r in range(repeats):  # interleaved, so load changes hit all three alike
        for v in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            samples[v].append(call(v) / steps)
        times = ", ".join(f"{v} {samples[v][-1]:.3f} s/step" for v in fns)
        print(f"{name} round {r}: {times}", flush=True)
    # all three ran the same steps from the same state: same step count
    assert len({int(s.step) for s in states.values()}) == 1
    med = {v: float(np.median(samples[v])) for v in fns}
    default = "python" if name == "unet" else "scan"  # step.py's CPU defaults
    vs = lambda v, ref="plain_jit", n=3: round(med[v] / med[ref], n)
    r4 = lambda t: round(t, 4)
    return {
        "model": {"unet": "UNet", "dit": "DiT (configs/fmnist_dit.py)"}[name],
        "model_config": dataclasses.asdict(mcfg), "batch_size": batch,
        "steps_per_call": steps, "repeats": repeats,
        "s_per_step_median": {v: r4(t) for v, t in med.items()},
        "steps_per_s": {v: round(1.0 / t, 3) for v, t in med.items()},
        "s_per_step_samples": {v: [r4(t) for t in s] for v, s in samples.items()},
        "first_call_s": compile_s, "default_loop_on_cpu": default,
        "default_vs_plain_jit": vs(default), "before_vs_plain_jit": vs("scan"),
        "after_vs_plain_jit": vs("python"),
        "speedup_after_vs_before": vs("scan", "python", 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, repeats=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per call")
    add_args(ap, dit_batch=8)
    ap.add_argument("--no-dit", action="store_true")
    add_args(ap, out="cpu.json", out_dir=None)
    args = ap.parse_args()
    assert jax.default_backend() == "cpu", "run with JAX_PLATFORMS=cpu"
    load_before, t0 = os.getloadavg(), time.perf_counter()
    rows = {"unet": bench("unet", 32, args.steps, args.repeats)}
    if not args.no_dit:
        rows["dit"] = bench("dit", args.dit_batch, args.steps, args.repeats)
    u, prov = rows["unet"], provenance()
    med, cpu, cores = u["s_per_step_median"], cpu_model(), len(os.sched_getaffinity(0))
    kept = {k: v for k, v in (load_result(args.out) or {}).items() if "search" in k}
    payload = {
        **prov,
        "jax_device": prov["device"], "device": f"{cpu}, {cores} cores",
        "cpu_model": cpu, "cpu_cores": cores,
        "shared_load": "machine shared with other engineers' test runs during the "
            f"measurement (load average {load_before[0]:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} cores): absolute "
            "times are inflated and noisy; variants were interleaved and medians "
            "taken, so the ratios are the figures to read",
        "what": "seconds per training step on XLA:CPU. plain_jit: one jitted step "
            "called from Python (reference); scan ('before'): "
            "make_train_steps(loop='scan'), steps_per_call steps in one jitted "
            "lax.scan, the old default; python ('after'): "
            "make_train_steps(loop='python'), the UNet's CPU default now; the DiT's "
            "flow steps keep the scan on CPU (default_loop_on_cpu)",
        "train_step_vs_plain_jit": u["after_vs_plain_jit"],
        "train_step_vs_plain_jit_before": u["before_vs_plain_jit"],
        "speedup_after_vs_before": u["speedup_after_vs_before"],
        "unet_s_per_step": dict(plain_jit=med["plain_jit"], before_scan=med["scan"],
                                after_python=med["python"]),
        "models": rows,
    }  # fmt: skip
    if "dit" in rows:
        payload["dit_train_step_vs_plain_jit"] = rows["dit"]["default_vs_plain_jit"]
    payload.update(kept, wall_s=round(time.perf_counter() - t0, 1))
    now = datetime.datetime.now(datetime.UTC)
    payload["finished"] = now.isoformat(timespec="seconds")
    print(write_json(args.out, payload, args.out_dir))


if __name__ == "__main__":
    main()
