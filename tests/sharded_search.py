"""The tiny search of test_search_engine on forced CPU devices, for
test_search_sharding (XLA_FLAGS must be set before jax is imported, hence a
script the test runs in a subprocess with `--xla_force_host_platform_device_count`).

  python tests/sharded_search.py OUT single
      3 generations on every device (OUT/full.npz); 1 generation on every device,
      "killed", then resumed on one device (OUT/resumed.npz); OUT/info.json.
  python tests/sharded_search.py OUT multi COORDINATOR NUM_PROCESSES PROCESS_ID
      one of several processes: 2 generations, resumed to 3, then the outputs,
      all in OUT/work; process 0 writes OUT/multi.npz and OUT/multi_info.json.
"""

import json
import sys
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _archive(state) -> dict:
    a = jax.device_get(state.archive)
    return {k: getattr(a, k) for k in ("genomes", "fid", "fitness", "bitops", "count")}


def _save(out: Path, name: str, state) -> None:
    import numpy as np

    from tmpq_jax import files

    files.atomic_write(out / f"{name}.npz", lambda p: np.savez(p, **_archive(state)))


def _setup(parts, devices=None):
    """The engine tests' search with static activation ranges (so the samples may
    be split over devices), on `devices`."""
    import jax.numpy as jnp
    from test_search_engine import SEARCH

    from tmpq_jax.quant.supernet import QParams
    from tmpq_jax.search import SearchConfig, SearchRunConfig, build_setup

    lm, reg, net, stats = parts
    cands = SearchConfig().candidates
    qparams = QParams(cands, jnp.full((len(reg), 2, len(cands)), 3.0), None)
    run = SearchRunConfig(search=SearchConfig(**SEARCH))
    return build_setup(run, lm, reg, qparams, None, net, stats, devices)


def _layout(setup) -> list[int]:
    return [int(n) for n in setup.engine.mesh.devices.shape]


def single(out: Path, parts) -> None:
    from tmpq_jax.search import run_generations

    every, one = _setup(parts), _setup(parts, jax.devices()[:1])
    _save(out, "full", run_generations(every, out / "full", progress=False))
    run_generations(every, out / "resume", progress=False, stop_after=1)  # "killed"
    _save(out, "resumed", run_generations(one, out / "resume", progress=False))
    info = {
        "devices": jax.device_count(),
        "layouts": {"every": _layout(every), "one": _layout(one)},
        "compiles": {
            "every": [f._cache_size() for f in every.engine.programs],
            "one": [f._cache_size() for f in one.engine.programs],
        },
    }
    (out / "info.json").write_text(json.dumps(info))


def multi(out: Path, parts) -> None:
    from tmpq_jax.search import run_generations
    from tmpq_jax.search.outputs import write_outputs

    setup, work = _setup(parts), out / "work"
    run_generations(setup, work, progress=False, stop_after=2)
    state = run_generations(setup, work, progress=False)  # restored from orbax
    result = write_outputs(setup, state, work, progress=False)
    _save(out, "multi", state)
    info = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "layout": _layout(setup),
        "evaluations": result["evaluations"],
    }
    if jax.process_index() == 0:
        (out / "multi_info.json").write_text(json.dumps(info))


def main(argv: list[str]) -> None:
    out, mode = Path(argv[0]), argv[1]
    if mode == "multi":
        from tmpq_jax.distributed import init_distributed

        init_distributed(argv[2], int(argv[3]), int(argv[4]))
    from conftest import TINY_UNET  # CPU, XLA's passes off: as in the tests
    from test_search_engine import tiny_parts

    from tmpq_jax.models.unet import init_params

    parts = tiny_parts(TINY_UNET, init_params(TINY_UNET, jax.random.key(1)))
    (single if mode == "single" else multi)(out, parts)


if __name__ == "__main__":
    main(sys.argv[1:])
