"""`python -m harness.bench`: a small run writes its table and plot, and an unreachable target is one
skip line, not a crash."""

from __future__ import annotations

import pandas as pd
import pytest

from harness import bench


@pytest.mark.slow
def test_a_small_bench_run(tmp_path, cache_dir, tiny_model_dir, smoke_questions, capsys):
    out = tmp_path / "bench"
    code = bench.main(["model=tiny", f"cache_dir={cache_dir}", "--frames", "2", "--videos", "1",
                       "--repeats", "1", "--max-new-tokens", "2", "--video-dir",
                       str(smoke_questions.parent / "videos"), "--methods", "none", "uniform", "fastv",
                       "--retentions", "0.5", "0.001", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    # FastV keeps its first K layers whole: 0.1 % of the prefill FLOPs is out of its reach
    assert "skipped fastv at retention 0.001: fastv.keep" not in captured.err
    assert "skipped fastv at retention 0.001: retention=0.001: unreachable" in captured.err
    table = pd.read_csv(out / "bench.csv")
    assert list(table["setting"]) == ["none", "uniform r=0.5", "uniform r=0.001", "fastv r=0.5"]
    none = table.set_index("setting").loc["none"]
    assert none["prefill speedup"] == 1.0 and none["TTFT speedup"] == 1.0
    assert table.set_index("setting").loc["uniform r=0.5", "rho_tok"] == pytest.approx(0.5, abs=0.02)
    assert (out / "speedup_vs_retention.png").stat().st_size > 0 and (out / "bench.md").is_file()
    assert "none" in captured.out and "prefill speedup" in captured.out


def test_method_specs_parse():
    assert bench.parse_method("scissor:tau=0.9,epsilon=0.05") == ("scissor", {"tau": 0.9, "epsilon": 0.05})
    assert bench.parse_method("fastv:K=3") == ("fastv", {"K": 3})
    assert bench.parse_method("uniform:retention=0.5+fastv:keep=0.3") == (
        "pipeline", {"stages": ["uniform", "fastv"], "uniform": {"retention": 0.5}, "fastv": {"keep": 0.3}})
