"""A search sharded over devices and processes (search/sharding.py): the layout of
the mesh, the distributed flags, and the engine tests' tiny search on 8 forced CPU
devices equal to the same search on one device, resumed on another device count,
and (TMPQ_MULTIPROCESS_TEST=1) run as 2 processes of 4 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax import distributed
from tmpq_jax.errors import UserError
from tmpq_jax.search import SearchConfig
from tmpq_jax.search import sharding as sh

HELPER = Path(__file__).with_name("sharded_search.py")


@pytest.mark.parametrize(
    "devices, population, samples, chunk, static, layout",
    [
        (8, 40, 2000, 0, True, (8, 1)),  # a population per device: no sample split
        (8, 3, 16, 0, True, (2, 4)),  # small population: the samples split
        (8, 3, 16, 0, False, (8, 1)),  # dynamic ranges: never split (padded)
        (4, 3, 16, 0, True, (2, 2)),
        (1, 3, 16, 0, True, (1, 1)),
        (8, 3, 18, 0, True, (8, 1)),  # 18 samples split over neither 4 nor 8
        (8, 3, 16, 3, True, (1, 8)),  # 4 a device: chunk 3 doesn't divide; 2 do
    ],
)
def test_layout(devices, population, samples, chunk, static, layout):
    got = sh.choose_layout(devices, population, samples, chunk, 0, static)
    assert got == layout


def test_layout_refuses_what_cannot_be_placed():
    with pytest.raises(
        UserError, match=r"does not divide the 8 devices.*\[1, 2, 4, 8\]"
    ):
        sh.choose_layout(8, 3, 16, pop_shards=3)
    with pytest.raises(UserError, match="static"):
        sh.choose_layout(8, 3, 16, pop_shards=2, static_ranges=False)
    with pytest.raises(UserError, match="num_samples=18 does not split over 4"):
        sh.choose_layout(8, 3, 18, pop_shards=2)
    assert sh.choose_layout(8, 3, 16, pop_shards=4) == (4, 2)
    with pytest.raises(UserError, match="exceeds search.population=4"):
        sh.search_mesh(SearchConfig(population=4, pop_shards=8))
    with pytest.raises(UserError, match="pop_shards=-1"):
        SearchConfig(pop_shards=-1)


def test_distributed_args():
    args = distributed.distributed_args
    assert args(env={}) is None  # one process: no initialize
    assert args(detect=True, env={}) == {}  # JAX detects the rest
    env = dict(JAX_COORDINATOR_ADDRESS="h:1234", JAX_NUM_PROCESSES="2")
    assert args(process_id=1, env=env) == dict(
        coordinator_address="h:1234", num_processes=2, process_id=1
    )
    with pytest.raises(UserError, match=r"missing: \['process_id'\]"):
        args(env=env)
    with pytest.raises(UserError, match="--process-id=2: use 0..1"):
        args("h:1", 2, 2, env={})
    with pytest.raises(UserError, match="JAX_PROCESS_ID='x'"):
        args(env={**env, "JAX_PROCESS_ID": "x"})
    with pytest.raises(UserError, match="HOST:PORT"):
        args("h", 2, 0, env={})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "2"], "missing: ['coordinator_address', 'process_id']"),
        (
            [
                "--coordinator-address",
                "h:1",
                "--num-processes",
                "2",
                "--process-id",
                "5",
            ],
            "--process-id=5: use 0..1",
        ),
    ],
)
def test_bad_distributed_flags_are_one_line(flags, message, tmp_path, capsys):
    from tmpq_jax.cli import main

    assert main(["search", "--workdir", str(tmp_path / "w"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_pad_rows():
    x = jnp.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(sh.pad_rows(x, 2), [[0, 1], [2, 3], [4, 5], [4, 5]])
    assert sh.pad_rows(x, 3) is x


def _run_helper(args: list[str], devices: int, **popen) -> subprocess.Popen:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    return subprocess.Popen(
        [sys.executable, str(HELPER), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _finish(proc: subprocess.Popen, timeout: int = 900) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def assert_same_search(a: dict, b: dict) -> None:
    """Same genomes scored; FIDs equal to float tolerance."""
    for k in ("count", "genomes", "bitops"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in ("fid", "fitness"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    _finish(_run_helper([str(out), "single"], devices=8))
    return out


def _load(path: Path) -> dict:
    with np.load(path) as z:
        return dict(z)


def test_eight_devices_equal_one_and_resume_on_another_count(eight_devices):
    info = json.loads((eight_devices / "info.json").read_text())
    assert info["devices"] == 8
    # population 4, then 3 a generation: 2 genomes x 4 sample shards
    assert info["layouts"] == {"every": [2, 4], "one": [1, 1]}
    # one compile per program; the resumed engine never compiled generation 0
    assert info["compiles"] == {"every": [1, 1], "one": [0, 1]}
    full = _load(eight_devices / "full.npz")
    # generation 0 on 8 devices, 1 and 2 on one device from the 8-device checkpoint
    assert_same_search(full, _load(eight_devices / "resumed.npz"))
    np.testing.assert_array_equal(full["count"], [4, 3, 3])
    assert np.isfinite(full["fid"][0]).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    os.environ.get("TMPQ_MULTIPROCESS_TEST") != "1",
    reason="2 processes compiling on CI's 2 cores; set TMPQ_MULTIPROCESS_TEST=1",
)
def test_two_processes_equal_one(eight_devices, tmp_path):
    addr = f"localhost:{_free_port()}"
    procs = [
        _run_helper([str(tmp_path), "multi", addr, "2", str(i)], devices=4)
        for i in range(2)
    ]
    for p in procs:
        _finish(p)
    info = json.loads((tmp_path / "multi_info.json").read_text())
    assert info == {"processes": 2, "devices": 8, "layout": [2, 4], "evaluations": 10}
    assert_same_search(_load(eight_devices / "full.npz"), _load(tmp_path / "multi.npz"))
    work = tmp_path / "work"
    log = (work / "search_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["generation"] for r in log] == [0, 1, 2]  # written once
    for name in ("result.json", "topk.json", "archive.npz", "best_samples.png"):
        assert (work / name).is_file()
