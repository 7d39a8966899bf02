"""A front from the command line: `tmpq sample --genome front.json --pick BITOPS`
serves the front's point at or below BITOPS, and bad front input (`tmpq search`,
`--pick`) is refused in one line, writing nothing."""

import json
import re

import numpy as np
import pytest

from tmpq_jax.cli import main
from tmpq_jax.diffusion.schedules import timestep_schedule
from tmpq_jax.genome_file import genome_to_dict, write_genome
from tmpq_jax.quant import QuantBits, unet_registry
from tmpq_jax.quant.calibration import model_fingerprint
from tmpq_jax.sampling import load_model

pytestmark = pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
CPU = "configs/fmnist_search_cpu.py"
POINTS = ((5, 2), (6, 3), (8, 10))  # (uniform bits, quad steps), rising BitOPs


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    """A front.json of the shipped model, written as a front search writes it."""
    lm = load_model()
    reg = unet_registry(lm.config)
    pts = [
        genome_to_dict(
            timestep_schedule("quad", n, 1000),
            QuantBits.uniform(reg, b, b),
            reg,
            (8, 7, 6, 5),
            calibration="checkpoints/fmnist_unet_calib",
            model_fingerprint=model_fingerprint(lm.card),
            fid_search=float(100 - 10 * b),
        )
        for b, n in POINTS
    ]
    wd = tmp_path_factory.mktemp("front")
    write_genome(wd / "front.json", {**pts[-1], "front": pts})
    write_genome(wd / "result.json", pts[-1])  # a genome file without a front
    return wd, [p["total_bitops"] for p in pts]


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _sample(*args):
    return main(["sample", "--num", "2", "--no-progress", *map(str, args)])


def test_pick_serves_the_front_point_at_or_below_the_budget(front, tmp_path, capsys):
    wd, costs = front
    assert costs == sorted(costs)
    npz = tmp_path / "s.npz"
    pick = (costs[1] + costs[2]) / 2  # between the 2nd and 3rd point: the 2nd
    assert _sample("--genome", wd / "front.json", "--pick", pick, "--npz", npz) == 0
    assert (
        f"the front's point of {costs[1]:.4g} total BitOPs" in capsys.readouterr().out
    )
    with np.load(npz) as z:
        np.testing.assert_array_equal(
            z["timesteps"], timestep_schedule("quad", 3, 1000)
        )
        assert z["images"].shape == (2, 28, 28, 1)


@pytest.mark.parametrize(
    ("genome", "pick", "msg"),
    [
        ("front.json", 0.5, "--pick=.* is below the cheapest point .* use at least"),
        ("front.json", -1.0, "is below the cheapest point"),
        ("front.json", "nan", "--pick=nan: give a number of BitOPs"),
        ("result.json", 1e12, "result.json holds no front; --pick reads the front"),
        (None, 1e12, "--pick is only used with --genome"),
    ],
)
def test_bad_pick_is_one_line_and_writes_nothing(
    front, tmp_path, capsys, genome, pick, msg
):
    wd, costs = front
    out = tmp_path / "g.png"
    where = [] if genome is None else ["--genome", wd / genome]
    if pick == 0.5:
        pick = costs[0] * 0.5
    assert _sample(*where, "--pick", pick, "--out", out) == 2
    assert re.search(msg, _err(capsys))
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        # a front of timesteps alone at a fixed N: BitOPs is not an objective
        (["objective=front", "space=timesteps"], "has one objective here"),
        (["objective=frontier"], "search.objective='frontier': use one of"),
        (["objective=front", "strategy=cma_es"], "is searched by one of ['nsga2']"),
        (
            ["timestep_mode=variable", "min_steps=12"],
            "search.min_steps=12: use 1..num_steps (10)",
        ),
        # W6A6 at 2 steps cannot pay for the cheapest bits (W5A5) at min_steps=6
        (
            ["objective=front", "timestep_mode=variable", "min_steps=6"]
            + ["budget_steps=2"],
            "below the cheapest genome of this search space",
        ),
    ],
)
def test_bad_front_search_is_one_line_and_writes_nothing(
    tmp_path, capsys, overrides, expect
):
    wd = tmp_path / "wd"
    flags = [f"--config.search.{o}" for o in overrides]
    assert main(["search", "--config", CPU, "--workdir", str(wd), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err
    assert not wd.exists()


def test_front_json_is_readable_as_one_genome(front):
    """Without --pick, front.json is the genome file of its top-level point."""
    wd, _ = front
    d = json.loads((wd / "front.json").read_text())
    assert d["format"] == "tmpq-genome/1" and len(d["front"]) == len(POINTS)


def test_search_prints_where_the_front_is(tmp_path, capsys, monkeypatch):
    def search(run, workdir, progress=True, rescore=False, model=None):
        assert run.search.objective == "front" and run.search.strategy == "nsga2"
        return {
            "rescored": {"fid": 1.0, "num_samples": 512},
            "fid_search": 1.5,
            "search_samples": 256,
            "total_bitops": 2e9,
            "budget_bitops": 2e9,
            "timesteps": [0, 500],
            "front": {"file": "front.json", "points": 3, "total_bitops": [1e9, 2e9]},
        }

    monkeypatch.setattr("tmpq_jax.search.search", search)
    args = ["search", "--config", CPU, "--workdir", str(tmp_path), "--no-progress"]
    assert main([*args, "--config.search.objective=front"]) == 0
    out = capsys.readouterr().out
    assert "front: 3 genomes, 1.00 to 2.00 GBitOPs" in out
    assert f"--genome {tmp_path / 'front.json'} --pick BITOPS" in out
