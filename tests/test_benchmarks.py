"""The benchmarks' own logic, on synthetic inputs (no device, no timing)."""

import pytest


def test_multi_gpu_summary_skips_compiling_generations():
    from benchmarks.multi_gpu import summarize

    raw = {
        "rows": [
            {"devices": 1, "generation_s": [60.0, 20.0, 5.0, 5.0],
             "evaluated_by_generation": [50, 40, 40, 40]},
            {"devices": 2, "generation_s": [40.0, 20.0, 2.5, 2.5],
             "evaluated_by_generation": [50, 40, 40, 40]},
            {"devices": 4, "error": ["OOM"]},
        ]
    }  # fmt: skip
    rows = summarize(raw)["rows"]
    assert rows[0]["steady_generation_s"] == 5.0
    assert rows[0]["evaluations_per_s_steady"] == 8.0
    assert rows[1]["speedup"] == 2.0 and rows[1]["scaling_efficiency"] == 1.0
    assert "speedup" not in rows[2]


def test_bandwidth_bound_is_the_default_programs_bytes_at_the_best_floor():
    from benchmarks.tables_perf import bandwidth_bound

    d = {
        "programs": {
            "quant_f32": {"bytes_by_kind": {"convolution": 4e9, "elementwise": 2e9},
                          "us_by_kind": {"convolution": 8000.0, "gemm": 2000.0,
                                         "elementwise": 5000.0},
                          "flops": 3e12, "wall_s": 0.01},
            "gn_7_floor": {"floor_bytes_per_s": 2e12},
            "gn_28_floor": {"floor_bytes_per_s": 3e12},
        }
    }  # fmt: skip
    text = bandwidth_bound(d, ceiling=600e12)
    # 6 GB at 3 TB/s: 2 ms; 3 TFLOP in 2 ms is 1500 TFLOP/s, 250% of the ceiling
    assert "6 GB" in text and "takes 2 ms" in text and "about 250%" in text
    # convolution + gemm 10 ms: 3 TFLOP in 10 ms is 300 TFLOP/s, 50.0% of 600
    assert "alone take 10.0 ms" in text and "could not pass 50.0%" in text
    assert bandwidth_bound(d, ceiling=None) is None


def test_search_table_merge_keeps_each_rows_provenance(tmp_path):
    """Rows from before rows carried provenance take their part's; a row run again
    replaces the old one; the footer says which device ran which rows."""
    import json

    from benchmarks.search_table import merge
    from benchmarks.tables import search_table

    def row(method, seed, fid, **prov):
        return dict(budget="w6a6", method=method, seed=seed, fid_10k=fid, fid_2k=fid,
                    bitops=1e11, budget_bitops=1e11, evaluations=810, **prov)  # fmt: skip

    old = dict(device="GPU-A", date="2026-11-25T10:00:00", command="cmd old",
               rows=[row("joint", 0, 3.0), row("joint", 1, 4.0),
                     row("precision", 0, 3.5)])  # fmt: skip
    new_prov = dict(device="GPU-B", date="2026-11-26T10:00:00", command="cmd row")
    new = dict(device="GPU-B", date="2026-11-26T11:00:00", command="cmd last",
               rows=[row("joint", 1, 5.0, **new_prov)])  # fmt: skip
    paths = []
    for name, part in (("old.json", old), ("new.json", new)):
        (tmp_path / name).write_text(json.dumps(part))
        paths.append(str(tmp_path / name))
    table = json.loads(merge(paths, str(tmp_path)).read_text())
    by_seed = {r["seed"]: r for r in table["rows"]}
    assert by_seed[0]["command"] == "cmd old" and by_seed[0]["device"] == "GPU-A"
    assert by_seed[1]["command"] == "cmd row" and by_seed[1]["fid_10k"] == 5.0
    text = search_table(table)
    assert "| fid | 2 | 4.00 ± 1.41 |" in text  # 3.0 and 5.0: the rerun row counts
    assert "GPU-A: every row but these; GPU-B: W6A6 joint (seed 1)" in text
    assert "2026-11-25 to 2026-11-26" in text
    # a merged table's rows without provenance do not all take its last part's
    merged = dict(old, parts=[dict(old), dict(new)])
    (tmp_path / "merged.json").write_text(json.dumps(merged))
    again = json.loads(
        merge([str(tmp_path / "merged.json")], str(tmp_path)).read_text()
    )
    assert all("command" not in r for r in again["rows"])


def test_fused_norm_quant_text_names_the_best_setting():
    from benchmarks.tables_perf import fused_norm_quant_text

    progs = {"gnq_28_xla": {"busy_us": 340.0}, "gnq_28_floor": {"busy_us": 160.0},
             "gnq_28_pallas": {"busy_us": 380.0, "mismatch_fraction": 3e-7},
             "gnq_28_blocks_g2_b1024_w4": {"busy_us": 200.0},
             "gnq_28_pallas_b4096_w16_s3": {"busy_us": 345.0}}  # fmt: skip
    d = dict(programs=progs, device="GPU", jax_version="0", date="2026-11-26",
             command="cmd")  # fmt: skip
    text = fused_norm_quant_text(d)
    assert (
        "28x28: 340 / 380 (best of 3 settings: 200, blocks_g2_b1024_w4) / 160" in text
    )


def test_racing_rows_reach_perf_json_and_its_target_line(tmp_path):
    """joint_race rows of a search table become perf.json's racing keys beside the
    full protocol's FIDs of the same seeds; the target line judges both halves."""
    import json

    from benchmarks.perf import DEFAULT_FITNESS, add_paper_search
    from benchmarks.tables_perf import _perf_targets

    prov = {"device": "GPU", "date": "2026-12-07T00:00:00", "command": "c"}
    row = lambda m, s, fid, wall, fit=DEFAULT_FITNESS: {"method": m, "budget": "w6a6",  # noqa: E731
                                   "seed": s, "fid_10k": fid, "wall_s": wall, "fitness": fit,
                                   "protocol": {"race_samples": 500}, **prov}  # fmt: skip
    full = [row("joint", s, f, 170.0) for s, f in enumerate((3.6, 4.1, 3.6))]
    fast = [row("joint_race", s, f, w) for s, f, w in ((0, 3.7, 55.0), (1, 3.9, 58.0))]
    other = [row("joint_race", 0, 9.0, 30.0, "fid"), row("joint", 0, 9.0, 90.0, "fid")]
    (tmp_path / "t.json").write_text(json.dumps({"rows": full + fast + other, **prov}))
    out = tmp_path / "perf.json"
    out.write_text(json.dumps({"shapes": {}, **prov, "jax_version": "x"}))
    add_paper_search(out, tmp_path / "t.json")
    d = json.loads(out.read_text())
    assert d["paper_search_wall_s"] == 170.0
    assert d["racing_search_wall_s"] == [55.0, 58.0]
    assert d["racing_search_fid_10k"] == [3.7, 3.9]
    assert d["full_search_fid_10k"] == [3.6, 4.1]  # the same seeds
    assert d["racing_search"]["fitness"] == DEFAULT_FITNESS == "teacher_pixels"
    assert d["paper_search"]["fitness"] == DEFAULT_FITNESS
    with pytest.raises(SystemExit, match="no joint W6A6 row of fitness 'ensemble'"):
        add_paper_search(out, tmp_path / "t.json", "ensemble")
    line = [r for r in _perf_targets(d).splitlines() if "racing" in r][0]
    assert "58 s" in line and "| met" in line
    d["racing_search_fid_10k"] = [4.5, 4.7]  # outside the full protocol's spread
    line = [r for r in _perf_targets(d).splitlines() if "racing" in r][0]
    assert "**not met**" in line
