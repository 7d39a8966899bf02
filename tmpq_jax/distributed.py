"""Several processes (hosts) as one JAX program: `jax.distributed.initialize`
from flags or the JAX_* environment, or detected by JAX on a TPU pod slice, under
SLURM or Open MPI. Call it before anything touches a JAX backend (importing
evosax does: keep this module free of tmpq_jax.search imports). Every process
then runs the same code; process 0 writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from tmpq_jax.errors import UserError

# The environment read where a flag is not given (JAX itself reads the first).
ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
FLAGS = "--coordinator-address, --num-processes and --process-id"


def _from_env(name: str, env: Mapping[str, str]) -> str | int | None:
    value = env.get(ENV[name]) or None
    if value is None or name == "coordinator_address":
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{ENV[name]}={value!r}: give an integer.") from None


def distributed_args(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    detect: bool = False,
    env: Mapping[str, str] | None = None,
) -> dict | None:
    """`jax.distributed.initialize`'s arguments (flags, else the JAX_* environment),
    or None for a single process. `detect`: let JAX find what is not given (TPU
    pod slice, SLURM, Open MPI)."""
    env = os.environ if env is None else env
    given = {"coordinator_address": coordinator_address}
    given.update(num_processes=num_processes, process_id=process_id)
    args = {k: v if v is not None else _from_env(k, env) for k, v in given.items()}
    args = {k: v for k, v in args.items() if v is not None}
    if not args and not detect:
        return None
    missing = [k for k in ENV if k not in args]
    if missing and not detect:
        raise UserError(
            f"a distributed search needs all of {FLAGS} (or {', '.join(ENV.values())}), "
            f"or --distributed on a TPU pod slice or under SLURM; missing: {missing}."
        )
    n, i = args.get("num_processes"), args.get("process_id")
    if n is not None and n < 1:
        raise UserError(f"--num-processes={n}: use at least 1.")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        ids = f"0..{n - 1}" if n is not None else "0 or more"
        raise UserError(f"--process-id={i}: use {ids} (one id per process).")
    addr = args.get("coordinator_address")
    if addr is not None and not addr.rpartition(":")[2].isdigit():
        raise UserError(f"--coordinator-address={addr!r}: give HOST:PORT of process 0.")
    return args


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    detect: bool = False,
) -> None:
    """Joins this process to a multi-process run (before any JAX computation);
    does nothing for a single process."""
    args = distributed_args(coordinator_address, num_processes, process_id, detect)
    if args is None:
        return
    try:
        jax.distributed.initialize(**args)
    except ValueError as e:  # JAX's cluster detection found nothing
        raise UserError(
            f"jax.distributed.initialize: {str(e).splitlines()[0]}; give {FLAGS}."
        ) from None


def is_main_process() -> bool:
    """Process 0 writes logs and result files (every process holds the same values)."""
    return jax.process_index() == 0
