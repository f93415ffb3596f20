"""The one-shot GPU check: --dry-run lists its steps and runs nothing, a missing CUDA device is one
error line, and its steps run end to end on the CPU with the tiny model (the report's shape)."""

import json

import pytest
import torch

from harness import gpu_check


def test_dry_run_lists_every_step_within_the_budget(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    for name in gpu_check.STEPS:
        assert name in out
    assert sum(seconds for seconds, _ in gpu_check.STEPS.values()) < 8 * 60
    assert not (tmp_path / "report").exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_no_cuda_device_is_one_error_line(capsys):
    assert gpu_check.main(["--steps", "keep-everything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda")


@pytest.mark.slow
def test_steps_run_on_cpu_and_write_one_report(tmp_path, monkeypatch):
    monkeypatch.setenv("VTC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    code = gpu_check.main(["--device", "cpu", "--quick", "--steps", "keep-everything", "host-syncs", "--out", str(out)])
    report = json.loads((out / "gpu_check.json").read_text())
    assert code == 0, report
    identity = report["steps"]["keep-everything"]["methods"]
    assert len(identity) == len(gpu_check.IDENTITY)
    assert all(row["equal"] and row["max_abs_diff"] == 0.0 for row in identity.values())
    counts = report["steps"]["host-syncs"]["methods"]
    assert "none" in counts and all("host_syncs" in c or "skipped" in c for c in counts.values())
    assert "## keep-everything: ok" in (out / "gpu_check.md").read_text()
