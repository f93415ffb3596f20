"""Data-parallel runs: 2 processes (gloo on CPU) give the single-process results sample for sample."""

import json
import os
import subprocess
import sys

import pytest

from harness.run.rundir import RunDir
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def launch(prefix, results, cache):
    env = {**os.environ, "VTC_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = [*prefix, "-m", "harness", "model=tiny", "task=smoke", "+method=uniform", "retention=0.25", "task.limit=5",
            "feature_cache=false", f"results_dir={results}", "progress=false"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir


def test_two_processes_equal_one(tmp_path, cache_dir, tiny_model_dir, smoke_questions):
    single = launch([sys.executable], tmp_path / "single", cache_dir)
    sharded = launch([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2"], tmp_path / "sharded", cache_dir)
    assert (sharded / "samples.rank1.jsonl").is_file()  # rank 1 really answered some samples
    one = {r["key"]: r for r in RunDir(single).samples()}
    two = {r["key"]: r for r in RunDir(sharded).samples()}
    assert one.keys() == two.keys() and len(one) == 5
    for key in one:
        assert two[key]["prediction"] == one[key]["prediction"]
        assert two[key]["score"] == one[key]["score"]
        assert two[key]["retention"] == one[key]["retention"]
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single, sharded))
    assert s2["score"] == s1["score"] and s2["n_samples"] == s1["n_samples"] == 5
