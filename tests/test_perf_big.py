"""Issue 26's one-line refusals: a population chunk that does not fit in memory
(naming the largest that fits), and fp8 asked of a device without fp8."""

import json
import types

import jax
import pytest

from benchmarks.perf_big import main
from benchmarks.perf_serve import fp8_supported
from tmpq_jax.errors import UserError
from tmpq_jax.search.fitness import chunk_memory

GIB = 2**30


def test_largest_chunk_that_fits():
    assert chunk_memory(GIB, 2 * GIB, 80 * GIB) == 39  # 1 GiB fixed + 2 a candidate
    assert chunk_memory(GIB, 2 * GIB, 80 * GIB, chunk=39) == 39


def test_chunk_that_does_not_fit_is_refused_in_one_line():
    with pytest.raises(UserError, match="candidate_chunk=40 does not fit") as e:
        chunk_memory(GIB, 2 * GIB, 80 * GIB, chunk=40)
    assert "the largest that fits is 39" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not even 1 fits"):
        chunk_memory(GIB, 2 * GIB, 2 * GIB, chunk=1)


def test_fp8_needs_ada_or_hopper():
    gpu = lambda cc: types.SimpleNamespace(  # noqa: E731
        platform="gpu", compute_capability=cc, device_kind="NVIDIA GPU"
    )
    assert fp8_supported(gpu("9.0")) is None and fp8_supported(gpu("8.9")) is None
    why = fp8_supported(gpu("8.0"))
    assert "no fp8" in why and "8.9+" in why and "\n" not in why
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    assert "no fp8" in fp8_supported(cpu)


def test_fp8_on_refused_without_fp8(tmp_path):
    # tests run on the CPU: --fp8 on stops in one line before anything is built
    with pytest.raises(SystemExit, match="--fp8 on: .* has no fp8"):
        main(["--tiny", "--fp8", "on", "--out", str(tmp_path / "p.json")])


def test_resume_keeps_the_earlier_parts_and_refuses_another_device(tmp_path):
    """A later call measures only the parts the first one's budget skipped; the
    earlier parts' figures, and what they were measured against, are kept."""
    first = tmp_path / "first.json"
    earlier = dict(device=jax.devices()[0].device_kind, size="tiny", date="2026-01-01",
                   command="perf_big (first)", bf16_ceiling_flops_per_s=123.0,
                   models={"dit": {"params": 1}},
                   dit=dict(ratio=0.5, quant_flops_per_s=41.0, seconds_per_candidate=2.0),
                   unet=dict(ratio=0.25), latency=dict(status="skipped: -1 s of --budget-s left"))  # fmt: skip
    first.write_text(json.dumps(earlier))
    out = tmp_path / "out.json"
    main(["--tiny", "--parts", "latency", "--fp8", "off", "--resume", str(first), "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["dit_quant_vs_bf16"]["value"] == 0.5 and d["unet_quant_vs_bf16"]["value"] == 0.25
    assert d["dit_fraction_of_bf16_ceiling"]["value"] == 41.0 / 123.0  # the dit run's ceiling
    assert d["latency"]["bf16"]["latency_s"] > 0  # measured now, not the earlier skip
    assert d["resumed_from"][0]["parts"] == ["dit", "unet"]
    earlier["device"] = "another GPU"
    first.write_text(json.dumps(earlier))
    with pytest.raises(SystemExit, match="resume only on the same device"):
        main(["--tiny", "--parts", "latency", "--resume", str(first), "--out", str(out)])
