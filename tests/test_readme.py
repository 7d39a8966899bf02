"""The README and docs/: the measured tables are exactly what
benchmarks/results/*.json say, and the README's Python example runs."""

import json
import re
import runpy
import time

import pytest

from benchmarks.quant_uniform import merge
from benchmarks.tables import README, ROOT, blocks, quant_uniform_table


@pytest.mark.parametrize(
    "path,begin,end,render", blocks(), ids=[b[3].__name__ for b in blocks()]
)
def test_rendered_blocks_match_results_json(path, begin, end, render):
    text = path.read_text()
    block = text[text.index(begin) + len(begin) : text.index(end)].strip()
    assert block == render().strip(), "run: python -m benchmarks.tables --docs"


def test_readme_is_short_and_docs_carry_no_tracker_numbers_or_hashes():
    assert len(README.read_text().splitlines()) <= 250
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert not re.search(r"\[\d+/\d+\]", text), f"{path}: a tracker number"
        hashes = re.findall(
            r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b", text
        )
        assert not hashes, f"{path}: commit hashes {hashes}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's ```python block, as it stands, from a directory holding docs/
    (its genome file); the shipped model and calibration come from the repo."""
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.py").write_text(code)
    t0 = time.perf_counter()
    scope = runpy.run_path(str(tmp_path / "example.py"))
    assert (tmp_path / "best.png").is_file()
    assert scope["images"].shape[1:] == (28, 28, 1)
    print(f"README example: {time.perf_counter() - t0:.1f} s")


def _part(command, calibration, fid, extra_rows=()):
    def row(config, calib, fid, w=32, a=32):
        return {
            "config": config,
            "w_bits": w,
            "a_bits": a,
            "calibration": calib,
            "steps": 10,
            "schedule": "quad",
            "fid": fid,
            "kid": 0.5,
            "kid_std": 0.1,
            "bitops": 3e12,
            "size_bits": 8e7,
            "finite_fraction": 1.0,
        }

    rows = [row("FP32", None, 10.0), row("W8A8", calibration, fid, 8, 8)]
    return {
        "device": "cpu",
        "date": "2026-01-01T00:00:00+00:00",
        "command": command,
        "wall_s": 1.0,
        "compile_s": {},
        "num_samples": 200,
        "seed": 0,
        "batch_size": 200,
        "candidates": [8],
        "calibrations": {
            calibration: {"seconds": 3.0, "min_mse_seconds": 3.0, "settings": {}}
        },
        "rows": rows + list(extra_rows),
    }


def test_quant_uniform_merge_keeps_fp_rows_once_and_renders(tmp_path):
    paths = []
    for i, (calib, fid) in enumerate((("minmse", 10.5), ("dynamic", 11.0))):
        p = tmp_path / f"part{i}.json"
        p.write_text(json.dumps(_part(f"cmd {calib}", calib, fid)))
        paths.append(str(p))
    merged = json.loads(merge(paths, str(tmp_path), "all.json").read_text())
    assert [(r["config"], r["calibration"]) for r in merged["rows"]] == [
        ("FP32", None),
        ("W8A8", "minmse"),
        ("W8A8", "dynamic"),
    ]
    assert set(merged["calibrations"]) == {"minmse", "dynamic"}
    table = quant_uniform_table(merged)
    assert "| W8A8 | min-MSE | 10.500 | 1.05 |" in table
    assert "`cmd minmse`; `cmd dynamic`" in table


def test_quant_uniform_merge_keeps_each_calibrations_widths(tmp_path):
    # a part calibrated at other widths joins; each calibration names its own
    a, b = _part("cmd a", "minmse", 10.5), _part("cmd b", "gptaq", 9.0)
    a["candidates"], b["candidates"] = [8, 7, 6, 5, 4], [8, 6, 4]
    b["date"] = "2026-02-01T00:00:00+00:00"
    for part in (a, b):
        next(iter(part["calibrations"].values()))["settings"] = {"seconds": 3.0}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, part in zip(paths, (a, b), strict=True):
        p.write_text(json.dumps(part))
    merged = json.loads(merge([str(p) for p in paths], str(tmp_path), "m.json").read_text())
    assert merged["calibrations"]["gptaq"]["candidates"] == [8, 6, 4]
    assert merged["calibrations"]["minmse"]["candidates"] == [8, 7, 6, 5, 4]
    table = quant_uniform_table(merged)
    assert "min-MSE of widths {8,7,6,5,4}" in table and "GPTAQ of widths {8,6,4}" in table
    assert "2026-01-01 to 2026-02-01" in table
    # one kind at two width sets would mix its rows: refused
    b["calibrations"] = {"minmse": a["calibrations"]["minmse"]}
    paths[1].write_text(json.dumps(b))
    with pytest.raises(SystemExit, match=r"minmse calibrated at widths \[8, 7, 6, 5, 4\] and \[8, 6, 4\]"):
        merge([str(p) for p in paths], str(tmp_path), "m2.json")


def test_search_table_merge_keeps_parts_and_replaces_rerun_rows(tmp_path):
    from benchmarks.search_table import merge as merge_table
    from benchmarks.tables import search_table

    def part(name, rows):
        p = tmp_path / f"{name}.json"
        head = {"device": "gpu", "date": "2026-01-01T00:00:00+00:00", "command": name}
        p.write_text(json.dumps({**head, "rows": rows}))
        return str(p)

    def row(method, seed, fid):
        return {
            "budget": "w6a6",
            "method": method,
            "seed": seed,
            "fid_10k": fid,
            "fid_2k": fid,
            "bitops": 1e11,
            "budget_bitops": 1e11,
            "evaluations": 810,
        }

    a = part("a", [row("joint", 0, 3.0), row("joint", 1, 4.0)])
    b = part("b", [row("joint", 1, 3.5), row("joint", 2, 3.6)])
    first = merge_table([a], str(tmp_path / "m1"))
    out = json.loads(merge_table([str(first), b], str(tmp_path / "m2")).read_text())
    assert [p["command"] for p in out["parts"]] == ["a", "b"]
    got = [(r["seed"], r["fid_10k"]) for r in out["rows"]]
    assert got == [(0, 3.0), (1, 3.5), (2, 3.6)]
    text = search_table(out)
    assert "| fid | 3 | 3.37 ± 0.32 |" in text and "Not yet run: precision, fid (seed 0, 1, 2)" in text


def test_search_table_rows_carry_every_space_and_parts_appear_once(tmp_path):
    """Merging fills `fid_eval_pixels` from a row's re-scoring, lists a part merged
    twice once, and every committed row names its fitness and every space."""
    from benchmarks.search_table import merge as merge_table

    scores = {"fid": 4.0, "fid_eval_resnet": 0.8, "fid_pixels": 1.2}
    row = {"budget": "w6a6", "method": "joint", "seed": 0, "fitness": "teacher"}
    row |= {"fid_eval_resnet": 0.8, "rescored": scores}
    p = tmp_path / "p.json"
    head = {"device": "gpu", "date": "2026-01-01T00:00:00+00:00", "command": "c"}
    p.write_text(json.dumps({**head, "rows": [row]}))
    out = json.loads(merge_table([str(p), str(p)], str(tmp_path)).read_text())
    assert out["rows"][0]["fid_eval_pixels"] == 1.2 and len(out["parts"]) == 1

    table = json.loads((ROOT / "benchmarks/results/search_table.json").read_text())
    need = ("fitness", "fid", "fid_eval_resnet", "fid_eval_simclr", "fid_eval_pixels")
    need += ("precision", "recall")
    for r in table["rows"]:
        assert all(r.get(k) is not None for k in need), (r["budget"], r["method"])
