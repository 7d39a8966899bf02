"""Training steps on XLA's CPU backend: the step loop against a plain `jax.jit` step.

`tmpq train` used to run its `steps_per_call` steps in one jitted `lax.scan`
(`loop="scan"`, "before"). On XLA:CPU that made a UNet step ~10x slower than the
same step jitted alone: XLA:CPU canonicalizes convolutions into the layout of its
fast (Eigen) kernels only outside loop bodies, and a conv left inside a while
body -- even of a length-1 scan, whose loop is removed later -- runs on a slow
generic kernel (the HLO shows `f01b_i01o->01bf` and `01oi` convolutions inside the
scan, only `b01f_01io->b01f` ones in the plain jit). The UNet's CPU default is
now n jitted steps called from Python (`loop="python"`, "after"). The DiT's flow
steps keep the scan on CPU: measured here, it beats the plain jitted step.

  JAX_PLATFORMS=cpu python -m benchmarks.cpu [--repeats 5] [--steps 2] [--no-dit]

Times, in one process on this CPU, the UNet (ch 16, batch 32, 28x28) and the DiT
of configs/fmnist_dit.py (batch --dit-batch): a plain jitted step called from
Python (the reference), the scan path and the Python-loop path, each call running
--steps steps; the three interleaved round by round, medians over --repeats
rounds, after one compiling call each. Writes benchmarks/results/cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import provenance, write_json
from tmpq_jax.config import TrainConfig, load_config
from tmpq_jax.diffusion.flow import FlowConfig, flow_loss
from tmpq_jax.diffusion.schedules import DiffusionConfig, make_noise_schedule
from tmpq_jax.models.dit import DiT, DiTConfig
from tmpq_jax.models.unet import UNet, UNetConfig
from tmpq_jax.train.step import (
    _apply_grads,
    create_train_state,
    ddpm_loss,
    make_flow_train_steps,
    make_optimizer,
    make_train_steps,
)

NUM_IMAGES = 60_000  # Fashion-MNIST's train split: the dataset lies on the device
DIT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fmnist_dit.py")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _plain_step(loss_fn, cfg: TrainConfig):
    """A plain jitted step (no loop), written from the library's public pieces."""
    tx = make_optimizer(cfg)

    @functools.partial(jax.jit, donate_argnums=0)  # as the library's steps
    def step(state, images, labels, key):
        k_idx, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
        x0 = images[idx].astype(jnp.float32) / 127.5 - 1.0
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x0, labels[idx], k_loss)
        return _apply_grads(state, grads, tx, cfg), loss

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

        def loss_fn(p, x0, y, k):
            return ddpm_loss(p, model, sched, x0, k)

        def wrap(fn):
            return lambda s, im, lab, k, n: fn(s, im, k, n)

        fns = {
            loop: wrap(make_train_steps(model, sched, tc, loop=loop))
            for loop in ("scan", "python")
        }
    else:
        c = load_config(DIT_CONFIG)
        mcfg = DiTConfig.from_dict(c.model.to_dict())
        model, flow = DiT(mcfg), FlowConfig.from_dict(c.flow.to_dict())

        def loss_fn(p, x0, y, k):
            return flow_loss(p, model, flow, x0, y, k, mcfg.null_label)

        fns = {
            loop: make_flow_train_steps(model, flow, tc, loop=loop)
            for loop in ("scan", "python")
        }
    fns = {"plain_jit": _plain_step(loss_fn, tc), **fns}
    return mcfg, fns, tc


def bench(name: str, batch: int, steps: int, repeats: int) -> dict:
    mcfg, fns, tc = _model(name, batch)
    rng = np.random.default_rng(0)
    shape = (NUM_IMAGES, mcfg.image_size, mcfg.image_size, mcfg.channels)
    images = jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 10, NUM_IMAGES, dtype=np.int32))
    key = jax.random.key(0)
    states = {v: create_train_state(jax.random.key(1), mcfg, tc) for v in fns}
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
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for v in order:
            samples[v].append(call(v) / steps)
        print(
            f"{name} round {r}: "
            + ", ".join(f"{v} {samples[v][-1]:.3f} s/step" for v in fns),
            flush=True,
        )
    # all three ran the same steps from the same state: same step count
    assert len({int(s.step) for s in states.values()}) == 1
    med = {v: float(np.median(samples[v])) for v in fns}
    default = "python" if name == "unet" else "scan"  # step.py's CPU defaults
    return {
        "model": {"unet": "UNet", "dit": "DiT (configs/fmnist_dit.py)"}[name],
        "model_config": dataclasses.asdict(mcfg),
        "batch_size": batch,
        "steps_per_call": steps,
        "repeats": repeats,
        "s_per_step_median": {v: round(t, 4) for v, t in med.items()},
        "steps_per_s": {v: round(1.0 / t, 3) for v, t in med.items()},
        "s_per_step_samples": {v: [round(t, 4) for t in s] for v, s in samples.items()},
        "first_call_s": compile_s,
        "default_loop_on_cpu": default,
        "default_vs_plain_jit": round(med[default] / med["plain_jit"], 3),
        "before_vs_plain_jit": round(med["scan"] / med["plain_jit"], 3),
        "after_vs_plain_jit": round(med["python"] / med["plain_jit"], 3),
        "speedup_after_vs_before": round(med["scan"] / med["python"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per call")
    ap.add_argument("--dit-batch", type=int, default=8)
    ap.add_argument("--no-dit", action="store_true")
    ap.add_argument("--out", default="cpu.json")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    assert jax.default_backend() == "cpu", "run with JAX_PLATFORMS=cpu"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = {"unet": bench("unet", 32, args.steps, args.repeats)}
    if not args.no_dit:
        rows["dit"] = bench("dit", args.dit_batch, args.steps, args.repeats)
    u = rows["unet"]
    prov = provenance()
    payload = {
        **prov,
        "jax_device": prov["device"],
        "device": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores",
        "cpu_model": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "shared_load": (
            "machine shared with other engineers' test runs during the measurement "
            f"(load average {load_before[0]:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} cores): absolute "
            "times are inflated and noisy; variants were interleaved and medians "
            "taken, so the ratios are the figures to read"
        ),
        "what": (
            "seconds per training step on XLA:CPU. plain_jit: one jitted step called "
            "from Python (reference); scan ('before'): make_train_steps(loop='scan'), "
            "steps_per_call steps in one jitted lax.scan, the old default; python "
            "('after'): make_train_steps(loop='python'), the UNet's CPU default "
            "now; the DiT's flow steps keep the scan on CPU (default_loop_on_cpu)"
        ),
        "train_step_vs_plain_jit": u["after_vs_plain_jit"],
        "train_step_vs_plain_jit_before": u["before_vs_plain_jit"],
        "speedup_after_vs_before": u["speedup_after_vs_before"],
        "unet_s_per_step": {
            "plain_jit": u["s_per_step_median"]["plain_jit"],
            "before_scan": u["s_per_step_median"]["scan"],
            "after_python": u["s_per_step_median"]["python"],
        },
        "models": rows,
        **(
            {"dit_train_step_vs_plain_jit": rows["dit"]["default_vs_plain_jit"]}
            if "dit" in rows
            else {}
        ),
        "wall_s": round(time.perf_counter() - t0, 1),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    print(write_json(args.out, payload, args.out_dir))


if __name__ == "__main__":
    main()
