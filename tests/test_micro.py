"""The embedded default: the trained micro model answers the synthetic task's held-out questions,
and the task tells a compressor that keeps the evidence from one that throws it away.

The micro model is trained once per session (the `micro_model_dir` fixture, minutes) where
`python -m harness` looks for it, so the literal default command below finds it built.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def default_command(*args, results, cache):
    env = {**os.environ, "VTC_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness", *args, f"results_dir={results}", "progress=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def summary_of(proc) -> dict:
    run_dir = proc.stdout.strip().splitlines()[-1].rsplit("-> ", 1)[1]
    return json.loads((REPO / run_dir / "summary.json").read_text() if not os.path.isabs(run_dir)
                      else open(os.path.join(run_dir, "summary.json")).read())


@pytest.fixture(scope="module")
def none_run(tmp_path_factory, cache_dir, micro_model_dir):
    results = tmp_path_factory.mktemp("micro_results")
    return default_command(results=results, cache=cache_dir), results


def test_the_default_command_scores_at_least_90_on_the_held_out_split(none_run):
    proc, results = none_run
    out, err = proc.stdout.strip().splitlines(), proc.stderr.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[synthetic task, trained micro model] synthetic | micro | none |")
    # the model was trained by the fixture: the run only prepares, loads and evaluates, quietly
    steps = [line for line in err if re.fullmatch(r".+ \.\.\. \d+\.\d\d s", line)]
    assert [s.split(" ...")[0] for s in steps] == [
        "preparing the data of task synthetic", "loading lmms_eval task vtc_synthetic_mc",
        "loading model micro (float32, auto)"]
    assert err == steps, err
    summary = json.loads(next(results.glob("*/summary.json")).read_text())
    assert summary["n_samples"] == 240 and summary["n_failed"] == 0
    assert summary["score"] >= 90.0, summary["score_by"]
    assert summary["caveats"] == ["synthetic task", "trained micro model"]
    assert set(summary["score_by"]) == {"background", "flash", "small", "direction"}
    assert all(part["n"] == 60 for part in summary["score_by"].values())
    # the overall score is the mean of the per-kind scores (equal counts)
    assert summary["score"] == pytest.approx(sum(p["score"] for p in summary["score_by"].values()) / 4)


def test_pooling_space_loses_the_small_square_that_token_selection_keeps(none_run, cache_dir):
    """At 5 % of the tokens, uniform pooling (a 2x2 grid per frame) blurs the one-token square into
    its background; DivPrune, which keeps the most different tokens, keeps it."""
    _, results = none_run
    none = json.loads(next(results.glob("*none*/summary.json")).read_text())
    pooled = summary_of(default_command("+method=uniform", "retention=0.05", results=results, cache=cache_dir))
    kept = summary_of(default_command("+method=divprune", "retention=0.05", results=results, cache=cache_dir))
    assert pooled["retention"]["rho_tok"]["mean"] == pytest.approx(kept["retention"]["rho_tok"]["mean"], abs=0.01)
    assert pooled["score_by"]["small"]["score"] <= none["score_by"]["small"]["score"] - 40
    assert kept["score_by"]["small"]["score"] >= pooled["score_by"]["small"]["score"] + 30
    # the background survives either way
    assert min(pooled["score_by"]["background"]["score"], kept["score_by"]["background"]["score"]) >= 90
