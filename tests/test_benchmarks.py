"""The benchmarks' own logic, on synthetic inputs (no device, no timing)."""

from benchmarks.trace import (
    breakdown,
    conv_operand_types,
    hlo_bytes,
    hlo_kinds,
    kernel_events,
)

HLO = """
ENTRY %main {
  %p0 = f32[8,28,28,32]{3,2,1,0} parameter(0)
  %cudnn-conv.1 = (f32[8,28,28,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %w), window={size=3x3}, custom_call_target="__cudnn$convForward"
  %gemm.2 = (f32[64,96]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  %input_reduce_fusion = (f32[8,8]{1,0}, f32[8,8]{1,0}) fusion(%x), kind=kInput, calls=%fused_reduce
  ROOT %loop_multiply_fusion.3 = f32[8,28,28,32]{3,2,1,0} fusion(%y, %z), kind=kLoop, calls=%fused_mul
  %copy.4 = f32[8,32,28,28]{3,2,1,0} copy(%y)
  %triton_gemm = f32[64,96]{1,0} fusion(%a, %b), kind=kCustom, calls=%triton_gemm_computation
  %custom-call.5 = (f32[8,784,64]{2,1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/down_0_res_0/skip/conv_general_dilated"}
  %input_concatenate_fusion.1 = f32[8,14,14,128]{3,2,1,0} fusion(%h, %s), kind=kInput, calls=%fused_concatenate.1
  %input_concatenate_reduce_fusion = (f32[8,8]{1,0}, f32[8,14,14,128]{3,2,1,0}) fusion(%h, %s), kind=kInput, calls=%fused_concat_reduce
}
"""


def _trace(events):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
         "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]  # fmt: skip
    return {"traceEvents": meta + events}


def _ev(tid, name, dur, op=None, pid=2):
    args = {"hlo_op": op} if op else {}
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": dur, "name": name,
            "args": args}  # fmt: skip


def test_hlo_kinds_names_each_instruction_kind():
    k = hlo_kinds(HLO)
    assert k["cudnn-conv.1"] == "convolution"
    assert k["gemm.2"] == "gemm"
    assert k["input_reduce_fusion"] == "reduction"
    assert k["loop_multiply_fusion.3"] == "elementwise"
    assert k["copy.4"] == "layout"
    assert k["triton_gemm"] == "gemm"
    assert k["p0"] == "other"
    # a 1x1 conv XLA turned into a cuBLAS gemm: its metadata says conv, it is a gemm
    assert k["custom-call.5"] == "gemm"
    assert k["input_concatenate_fusion.1"] == "concatenate"
    assert k["input_concatenate_reduce_fusion"] == "reduction"


def test_breakdown_counts_stream_kernels_once_per_run():
    """Only the device's stream lines count (the derived 'XLA Ops' line repeats the
    same kernels, host events are not device time); time is per run."""
    events = [
        _ev(7, "sm90_xmma_fprop", 30.0, "cudnn-conv.1"),
        _ev(7, "loop_multiply_fusion_3", 10.0, "loop_multiply_fusion.3"),
        _ev(7, "input_reduce_fusion", 20.0, "input_reduce_fusion"),
        _ev(7, "some_cutlass_gemm_kernel", 40.0),  # no hlo_op: by its name
        _ev(9, "cudnn-conv.1", 30.0, "cudnn-conv.1"),  # derived line: ignored
        _ev(1, "PjitFunction", 500.0, pid=1),  # host: ignored
    ]
    got = breakdown(kernel_events(_trace(events)), hlo_kinds(HLO), repeats=2)
    assert got["busy_us"] == 50.0
    assert got["kernels_per_run"] == 2.0
    assert got["us_by_kind"] == {
        "convolution": 15.0, "gemm": 20.0, "reduction": 10.0, "concatenate": 0.0,
        "elementwise": 5.0, "layout": 0.0, "other": 0.0,
    }  # fmt: skip
    assert abs(sum(got["fraction_by_kind"].values()) - 1) < 1e-9
    assert got["top"][0] == dict(
        kind="gemm", op="", kernel="some_cutlass_gemm_kernel", us=20.0, bytes=0.0
    )
    assert got["top"][1]["op"] == "cudnn-conv.1"


HLO_BYTES = """
ENTRY %main {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = bf16[4,2]{1,0} parameter(1)
  %conv = (f32[8,2]{1,0}, u8[1024]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$convForward"
  %gte = f32[8,2]{1,0} get-tuple-element(%conv), index=0
  ROOT %loop_add_fusion = f32[8,2]{1,0} fusion(%gte, %p0), kind=kLoop, calls=%f
}
"""


def test_hlo_bytes_count_result_and_operands_once_without_scratch():
    b = hlo_bytes(HLO_BYTES)
    assert b["conv"] == 8 * 2 * 4 + 8 * 4 * 4 + 4 * 2 * 2  # workspace not counted
    assert b["loop_add_fusion"] == 64 + 64 + 128
    events = [
        _ev(7, "fprop", 2.0, "conv"),
        _ev(7, "loop_add_fusion", 1.0, "loop_add_fusion"),
    ]
    got = breakdown(kernel_events(_trace(events)), hlo_kinds(HLO_BYTES), 1, b)
    assert got["bytes_by_kind"]["elementwise"] == 256
    assert got["bytes_per_s_by_kind"]["elementwise"] == 256 / 1e-6
    assert got["bytes_per_s_by_kind"]["convolution"] == 208 / 2e-6
    assert conv_operand_types(HLO_BYTES) == {"f32 x bf16": 1}


def test_breakdown_without_a_gpu_takes_the_events_naming_an_hlo_op():
    trace = {
        "traceEvents": [
            {
                "ph": "M",
                "pid": 1,
                "name": "process_name",
                "args": {"name": "/host:CPU"},
            },
            _ev(3, "cudnn-conv.1", 8.0, "cudnn-conv.1", pid=1),
            _ev(3, "PjitFunction(f)", 100.0, pid=1),  # host bookkeeping: no hlo_op
        ]
    }
    got = breakdown(kernel_events(trace), hlo_kinds(HLO), repeats=1)
    assert got["busy_us"] == 8.0 and got["us_by_kind"]["convolution"] == 8.0


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
    assert "4.00 ± 1.41 (2 seeds)" in text  # 3.0 and 5.0: the rerun row counts
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
