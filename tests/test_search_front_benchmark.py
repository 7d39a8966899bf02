"""benchmarks/search_front.py (issue 22's variable-N benchmark) on synthetic inputs,
and the variable mode's seed it relies on: the budget's uniform genome on its own
quad steps, so a variable search starts where a fixed-N search at the budget does."""

import argparse
import json
import re
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import search_front as S
from tmpq_jax.diffusion.schedules import quad_timesteps
from tmpq_jax.errors import UserError
from tmpq_jax.quant import cost, unet_registry
from tmpq_jax.search import budget as B
from tmpq_jax.search.config import SearchConfig
from tmpq_jax.search.space import GenomeSpace


@pytest.fixture(scope="module")
def reg(tiny_cfg):
    return unet_registry(tiny_cfg)


# -- the variable mode's seed --------------------------------------------------------
@pytest.mark.parametrize(("budget_steps", "k"), [(4, 4), (1, 2), (30, 12), (12, 12)])
def test_variable_seed_is_the_budgets_uniform_genome_on_its_quad_steps(
    reg, budget_steps, k
):
    """k = budget_steps, clipped to min_steps..num_steps; the seed meets a budget of
    its own bits exactly (repair leaves it), and pads with repeats (no-op steps)."""
    kw = dict(timestep_mode="variable", num_steps=12, min_steps=2)
    kw.update(budget_steps=budget_steps, budget_w_bits=6, budget_a_bits=6)
    space = GenomeSpace.build(SearchConfig(**kw), reg)
    assert ((space.seed >= space.lo) & (space.seed < space.hi)).all()
    d = space.decode(jnp.asarray(space.seed))
    assert int(d.num_steps) == k == int(space.seed[12])
    np.testing.assert_array_equal(np.unique(d.timesteps), quad_timesteps(k))
    total = float(B.genome_cost(space, reg, jnp.asarray(space.seed))[0])
    np.testing.assert_allclose(total, B.budget_bitops(reg, 6, 6, k), rtol=1e-6)
    budget = B.budget_bitops(reg, 6, 6, budget_steps)
    if cost.within_budget(total, budget):
        fixed = B.repair(space, reg, jnp.asarray(space.seed), budget)
        np.testing.assert_array_equal(fixed, space.seed)
    if budget_steps == 4:  # before: 12 quad steps, 3x the budget, bits repaired away
        assert total * 2.9 < float(cost.uniform_bitops(reg, 6, 6)) * 12


def test_a_variable_precision_space_keeps_its_frozen_quad_seed(reg):
    cfg = SearchConfig(space="precision", timestep_mode="variable", num_steps=8)
    space = GenomeSpace.build(cfg.replace(budget_steps=3), reg)
    assert ((space.seed >= space.lo) & (space.seed < space.hi)).all()
    np.testing.assert_array_equal(space.seed[:8], quad_timesteps(8))


# -- the benchmark's bookkeeping ----------------------------------------------------
def test_budgets_parse_and_refuse_in_one_line():
    assert S.parse_budget("w4a8x4") == (4, 8, 4)
    with pytest.raises(UserError, match="is not wWaAxN") as e:
        S.parse_budget("w6a6")
    assert "\n" not in str(e.value)


def test_shards_split_the_units_once_each_and_balance_them():
    work = [((m, b, 0, None), c) for m, c in (("j", 20), ("p", 5), ("u", 0.1))
            for b in "abcdefg"]  # fmt: skip
    parts = [S.shard(work, f"{i}/4") for i in range(4)]
    flat = [u for p in parts for u in p]
    assert sorted(flat) == sorted(u for u, _ in work)  # each unit in one shard
    cost = dict(work)
    loads = [sum(cost[u] for u in p) for p in parts]
    assert max(loads) - min(loads) <= 20  # at most one long unit apart
    assert S.shard(work, None) == [u for u, _ in work]


def _row(method, budget, seed, steps, fid, select, evals=10, **kw):
    return dict(method=method, budget=budget, budget_bitops=100.0, seed=seed,
                steps=steps, fid=fid, fid_2=2 * fid, select_score=select,
                evaluations=evals, total_bitops=90.0, protocol={"population": 6},
                unit=f"{method}/{budget}/{seed}/{steps}", device="CPU",
                rescored={"num_samples": 10_000},
                date="2026-12-08T00:00:00", command="cmd", **kw)  # fmt: skip


def test_best_fixed_n_is_chosen_by_the_train_split_score_never_the_test_fid():
    grid = [2, 4, 8]
    rows = [  # N = 2: the best test FID, the worst select score
        _row("precision_n", "w4a8x4", 0, 2, fid=1.0, select=9.0, grid=grid),
        _row("precision_n", "w4a8x4", 0, 4, fid=5.0, select=3.0, grid=grid),
    ]
    assert not any(r["method"] == "precision" for r in S.with_precision(rows))
    rows.append(_row("precision_n", "w4a8x4", 0, 8, fid=3.0, select=4.0, grid=grid))
    (best,) = [r for r in S.with_precision(rows) if r["method"] == "precision"]
    assert best["steps"] == 4 and best["fid"] == 5.0  # lowest select_score
    assert best["evaluations"] == 30  # every N tried is paid for
    assert best["chosen_by_select_score"] == {"2": 9.0, "4": 3.0, "8": 4.0}
    again = S.with_precision(S.with_precision(rows))  # derived rows are not stacked
    assert sum(r["method"] == "precision" for r in again) == 1


def test_front_rows_fit_each_budget_and_split_the_evaluations(
    reg, tmp_path, monkeypatch
):
    """Archive entries with BitOPs and fitness; re-scoring is stubbed: its test FID
    is the fitness + 10, its select score the fitness reversed within the top-2, so
    the choice must follow the select score."""
    b_hi, b_lo = B.budget_bitops(reg, 8, 8, 4), B.budget_bitops(reg, 4, 8, 2)
    bitops = np.array([b_hi * 1.5, b_hi, b_hi * 0.8, b_lo, b_lo * 0.9, b_lo * 0.5])
    fid = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 6.0], np.float32)
    n = len(fid)
    np.savez(tmp_path / "archive.npz", genomes=np.arange(n)[:, None] * np.ones((1, 3)),
             fid=fid, fitness=fid, bitops=bitops, samples=np.full(n, 8),
             num_steps=np.full(n, 2), timesteps=np.tile([[5, 50, 50]], (n, 1)))  # fmt: skip

    def rescored(setup, genome, progress):
        i = int(genome[0])
        return {"fid": fid[i] + 10, S.FID_2: fid[i] + 20}, None, -fid[i]

    monkeypatch.setattr(S, "rescore_and_select", rescored)
    setup = types.SimpleNamespace(
        registry=reg, run=types.SimpleNamespace(search=SearchConfig(rescore_top_k=2))
    )
    res = {"evaluations": 90, "front": {"points": 4}}
    budgets = ["w8a8x4", "w4a8x2", "w4a4x1"]  # the last: below every entry
    rows = S.front_rows(setup, res, tmp_path, budgets)
    assert [r["budget"] for r in rows] == ["w8a8x4", "w4a8x2"]
    for r in rows:
        assert cost.within_budget(r["total_bitops"], r["budget_bitops"])
        assert r["evaluations"] == 45 and r["front_budgets"] == 2
    # top-2 within each budget by fitness: (1.0, 2.0) and (3.0, 4.0); select picks
    # the larger fitness (select = -fitness), the test FID never decides
    assert [r["fid_search"] for r in rows] == [2.0, 4.0]
    assert [r["fid"] for r in rows] == [12.0, 14.0]
    assert [r["fid_2"] for r in rows] == [22.0, 24.0]
    assert rows[0]["timesteps"] == [5, 50]


def test_table_and_figure_render_from_the_json_with_the_seed_spread(tmp_path):
    rows = [_row("joint", "w6a6x6", s, 5, fid=f, select=f)
            for s, f in enumerate((3.0, 4.0, 5.0))]  # fmt: skip
    rows += [_row("uniform", "w6a6x6", 0, 6, fid=9.0, select=9.0, evals=1)]
    rows += [_row("front", "w6a6x6", 0, 4, fid=4.5, select=4.5, evals=7.5)]
    d = {"rows": rows}
    text = S.table(d)
    assert "4.00 ± 1.00 [3.00–5.00] (N 5)" in text  # fid: mean ± sd [min–max]
    assert "8.00 ± 2.00 [6.00–10.00] (N 5)" in text  # fid_2 in its own table
    assert "| 9.00 (N 6) |" in text and "| 7.5 |" in text  # the front's evaluations
    assert "10000 fresh samples" in text and "W6A6 x6 (0.0 GBitOPs)" in text
    assert "Not yet run: full precision" in text and "precision-only" in text
    S.figure(d, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000


@pytest.mark.parametrize("fitness", ["fid", "ensemble", "teacher", "teacher_pixels"])
def test_only_the_pixels_only_teacher_leaves_the_classifier_space_unseen(fitness):
    """The default teacher sees no FID space: every table says unseen; a fitness
    that scores or matches in the classifier's features has seen its space. The
    pixel space gets its own table where the rows hold it."""
    rows = [_row("joint", "w6a6x6", 0, 5, fid=3.0, select=3.0, fitness=fitness,
                 fid_eval_pixels=1.5)]  # fmt: skip
    text = S.table({"rows": rows})
    own = "FID clf. (seen by the fitness)"
    assert (own in text) == (fitness != "teacher_pixels")
    assert "FID ResNet (unseen)" in text and "FID pixels (unseen)" in text
    assert "| 1.50 (N 5) |" in text
    assert "FID pixels" not in S.table({"rows": [_row("joint", "w6a6x6", 0, 5, 3.0, 3.0)]})


def test_merge_replaces_a_unit_measured_again(tmp_path):
    old = _row("joint", "w6a6x6", 0, 5, fid=3.0, select=3.0)
    new = _row("joint", "w6a6x6", 0, 6, fid=2.0, select=2.0)
    new["unit"] = old["unit"]
    for i, r in enumerate((old, new)):
        r.update(date="d", command=f"c{i}")  # rows carry their file's provenance
        part = {"device": "CPU", "date": "d", "command": f"c{i}", "rows": [r]}
        (tmp_path / f"p{i}.json").write_text(json.dumps(part))
    out = S.merge([str(tmp_path / "p0.json"), str(tmp_path / "p1.json")], tmp_path)
    d = json.loads(out.read_text())
    assert [r["fid"] for r in d["rows"]] == [2.0]
    assert [p["command"] for p in d["parts"]] == ["c0", "c1"]
    assert d["command"] == "c1"  # the measuring part's, not the merging machine's


def test_merge_names_every_command_its_rows_were_measured_by(tmp_path):
    """A file resumed across calls names only its last command at its top level;
    the merge lists the earlier calls' commands from the rows."""
    a = _row("uniform", "w6a6x6", 0, 6, fid=9.0, select=9.0)
    b = _row("front", "w6a6x6", 0, 4, fid=4.5, select=4.5)
    a.update(date="t1", command="first call", device="GPU")
    b.update(date="t2", command="last call", device="GPU")
    f = {"device": "GPU", "date": "t2", "command": "last call", "rows": [a, b]}
    (tmp_path / "f.json").write_text(json.dumps(f))
    d = json.loads(S.merge([str(tmp_path / "f.json")], tmp_path / "m").read_text())
    assert [p["command"] for p in d["parts"]] == ["last call", "first call"]
    assert d["parts"][1]["date"] == "t1"


def test_merge_backfills_the_pixel_space_and_lists_each_part_once(tmp_path):
    """Rows written before `fid_eval_pixels` had a key gain it from their report;
    a merged file merged again with one of its parts repeats no part."""
    r = _row("joint", "w6a6x6", 0, 5, fid=3.0, select=3.0)
    r["rescored"] = {"num_samples": 10_000, "fid_pixels": 0.7}
    r.update(device="GPU", date="d", command="c0")
    part = {"device": "GPU", "date": "d", "command": "c0", "rows": [r]}
    (tmp_path / "p0.json").write_text(json.dumps(part))
    first = S.merge([str(tmp_path / "p0.json")], tmp_path / "m1")
    again = json.loads(S.merge([str(first), str(tmp_path / "p0.json")], tmp_path).read_text())
    assert [row["fid_eval_pixels"] for row in again["rows"]] == [0.7]
    assert [p["command"] for p in again["parts"]] == ["c0"]
    assert again["device"] == "GPU"


def test_precision_grid_keeps_only_feasible_n(reg, monkeypatch):
    """N = round(f x budget steps), capped at max_steps; an N whose cheapest bits
    exceed the budget is left out (its search would be refused)."""
    a = argparse.Namespace(precision_factors="0.5,1,2,8", max_steps=20, min_steps=2,
                           protocol="tiny", override=[], workdir_root="/nonexistent")  # fmt: skip
    steps = S.precision_steps(a, "w4a8x4", reg)
    assert steps[:2] == [2, 4] and max(steps) <= 20
    floor = [
        B.min_bitops(GenomeSpace.build(SearchConfig(space="precision",
                     candidates=(8, 7, 6, 5, 4), num_steps=n), reg), reg)
        for n in (8, 20)
    ]  # fmt: skip
    budget = B.budget_bitops(reg, 4, 8, 4)
    assert (8 in steps) == cost.within_budget(floor[0], budget)
    assert (20 in steps) == cost.within_budget(floor[1], budget)


def test_every_default_unit_fits_its_own_budget(reg):
    """The pre-check passes the default methods and budgets (fp_steps is held to
    the float model's cost at the budget's N, not to the budget's bits: the first
    GPU run was refused there) and still refuses a budget below its space."""
    a = argparse.Namespace(methods=S.METHODS, budgets=S.BUDGETS, seeds="0",
                           precision_factors="0.5,1,2", max_steps=20, min_steps=2,
                           protocol="tiny", override=[], workdir_root="/nonexistent")  # fmt: skip
    work = [u for u, _ in S.units(a, reg)]
    assert {u[0] for u in work} == set(S.METHODS.split(","))
    for u in work:
        S.check_unit(a, u, reg)
    high = argparse.Namespace(**{**vars(a), "min_steps": 4})  # 4 steps cost > 1
    with pytest.raises(UserError, match="below the cheapest genome"):
        S.check_unit(high, ("joint", "w4a8x1", 0, None), reg)


@pytest.mark.parametrize(
    ("flags", "msg"),
    [
        (["--min-steps", "30"], "search.min_steps=30: use 1..num_steps (20)"),
        (["--budgets", "w4a8x1", "--min-steps", "4"], "below the cheapest genome"),
        (["--budgets", "w8a8x20,w6a6"], "--budgets: 'w6a6' is not wWaAxN"),
    ],
)
def test_bad_benchmark_input_is_refused_in_one_line_before_any_work(
    flags, msg, tmp_path, monkeypatch
):
    """On the shipped model: nothing is calibrated, searched or written."""
    where = ["--out-dir", str(tmp_path / "out"), "--workdir-root", str(tmp_path / "w")]
    monkeypatch.setattr(sys, "argv", ["search_front", *flags, *where])
    with pytest.raises(UserError, match=re.escape(msg)) as e:
        S.main()
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())
