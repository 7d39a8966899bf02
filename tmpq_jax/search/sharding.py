"""A search over every device: the population (and, for a small population, each
candidate's samples) sharded over a `jax.sharding.Mesh`; several hosts through
`jax.distributed`.

The mesh has two axes. POP splits the candidates of a generation; SAMPLE splits
each candidate's fixed noise batch, used where the population is smaller than the
device count (the features are all-gathered before the FID, so the FID is the one
of all the samples). A generation stays one compiled program: ask, repair, tell
and the archive run replicated, the evaluation under `shard_map`, each device
scoring its rows with the existing `lax.map` chunking. A population that does not
divide POP is padded with copies of its last genome whose scores are dropped.
A race (`racing.py`) runs both its stages this way: its prefix splits over
SAMPLE too.
The search state is replicated: a checkpoint is a plain pytree that restores onto
any mesh, so a search resumes on another device count.

With several processes (`tmpq_jax.distributed`) every process runs the same
program and the mesh spans every process's devices.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tmpq_jax.errors import UserError

POP, SAMPLE = "pop", "sample"

# ----------------------------------------------------------------------------
# The mesh, and arrays placed on it.


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sample_split_problem(
    k: int,
    num_samples: int,
    sample_chunk: int,
    static_ranges: bool,
    race_samples: int = 0,
) -> str | None:
    """Why the noise batch (and a race's prefix of it) cannot be split over `k`
    devices (None: it can)."""
    if k == 1:
        return None
    if not static_ranges:
        # Dynamic (absmax) activation ranges are taken over a candidate's whole
        # batch: a device holding part of it would quantize differently.
        return "splitting the samples needs calibrated (static) activation ranges"
    for name, n in (("num_samples", num_samples), ("race_samples", race_samples)):
        if not n:
            continue
        if n % k:
            return f"{name}={n} does not split over {k} devices"
        local = n // k
        if sample_chunk and sample_chunk < local and local % sample_chunk:
            return f"sample_chunk={sample_chunk} does not divide the {local} samples a device draws"
    return None


def choose_layout(
    num_devices: int,
    population: int,
    num_samples: int,
    sample_chunk: int = 0,
    pop_shards: int = 0,
    static_ranges: bool = True,
    race_samples: int = 0,
) -> tuple[int, int]:
    """(POP, SAMPLE) sizes, their product `num_devices`. `population`: the smallest
    number of genomes a generation evaluates. Auto (`pop_shards=0`): the most POP
    devices that each get a genome, the rest splitting the samples where they can;
    else all devices on POP (padded)."""
    if pop_shards:
        if num_devices % pop_shards:
            raise UserError(
                f"search.pop_shards={pop_shards} does not divide the {num_devices} "
                f"devices; use one of {_divisors(num_devices)} or 0 (auto)."
            )
        why = _sample_split_problem(
            num_devices // pop_shards,
            num_samples,
            sample_chunk,
            static_ranges,
            race_samples,
        )
        if why:
            raise UserError(f"search.pop_shards={pop_shards}: {why}; use 0 (auto).")
        return pop_shards, num_devices // pop_shards
    for pop in reversed(_divisors(num_devices)):
        k = num_devices // pop
        if pop <= population and not _sample_split_problem(
            k, num_samples, sample_chunk, static_ranges, race_samples
        ):
            return pop, k
    return num_devices, 1


def search_mesh(
    cfg, devices: Sequence[jax.Device] | None = None, static_ranges: bool = True
) -> Mesh:
    """The (POP, SAMPLE) mesh of a search over `devices` (default: every device of
    every process). `cfg`: a SearchConfig."""
    devices = list(jax.devices() if devices is None else devices)
    if cfg.pop_shards > cfg.population:
        raise UserError(
            f"search.pop_shards={cfg.pop_shards} exceeds search.population="
            f"{cfg.population}: devices would score padding only; use at most "
            f"{cfg.population} or 0 (auto)."
        )
    shape = choose_layout(
        len(devices),
        min(cfg.population, cfg.offspring),
        cfg.num_samples,
        cfg.sample_chunk,
        cfg.pop_shards,
        static_ranges,
        cfg.race_samples,
    )
    # Auto axes: the compiler places everything outside the shard_map (replicated).
    return jax.make_mesh(
        shape, (POP, SAMPLE), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """`tree` (the same values on every process) copied onto every device of
    `mesh`, from host memory: works for arrays committed to one local device, and
    across processes without a collective."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return jax.tree.map(put, tree)


def split_batch(x, mesh: Mesh | None) -> jax.Array:
    """`x` (the same on every process) with its leading axis split over every
    device of `mesh` where it divides, else replicated (None: `x` as it is)."""
    if mesh is None:
        return x
    spec = P((POP, SAMPLE)) if x.shape[0] % mesh.size == 0 else P()
    x = np.asarray(x)
    return jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, spec), lambda i: x[i]
    )


def gather(x: jax.Array) -> np.ndarray:
    """The whole of `x` on the host, also when other processes hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)


# ----------------------------------------------------------------------------
# The evaluation.


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """`x` with copies of its last row appended up to a multiple of `multiple`."""
    pad = -x.shape[0] % multiple
    if not pad:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])


def population_fid(problem, mesh: Mesh, assets, genomes: jax.Array) -> jax.Array:
    """`problem.population_fid` with the genomes split over POP and the noise batch
    over SAMPLE; float32[P] for int32[P, D], replicated."""
    n = genomes.shape[0]
    split = mesh.shape[SAMPLE] > 1
    rows = P(SAMPLE) if split else P()
    specs = jax.tree.map(lambda _: P(), assets).replace(
        noise=rows, labels=None if assets.labels is None else rows
    )
    # check_vma off: the all-gathered features make each FID the same on every
    # SAMPLE device, which the type system does not infer for lax.all_gather.
    fn = jax.shard_map(
        functools.partial(problem.population_fid, axis=SAMPLE if split else None),
        mesh=mesh,
        in_specs=(specs, P(POP)),
        out_specs=P(POP),
        check_vma=False,
    )
    return fn(assets, pad_rows(genomes, mesh.shape[POP]))[:n]
