"""Retention targeting: Scissor's tau is bisected until the mean achieved rho_tok hits the target."""

import json

import pytest

from harness.errors import ConfigError
from harness.run.calibrate import TOLERANCE, _documents, bisect_knob
from tests.helpers import run_config


@pytest.mark.slow
def test_scissor_retention_target_is_reached_and_cached(cfg_factory, cache_dir, capsys):
    # the calibration subset is the first 8 documents: run exactly those
    cfg = cfg_factory("+method=scissor", "retention=0.3", "task.limit=8")
    run_dir = run_config(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["label"] == "r=0.3" and summary["target_retention"] == 0.3
    assert abs(summary["retention"]["rho_tok"]["mean"] - 0.3) <= TOLERANCE
    config = json.loads((run_dir / "config.json").read_text())
    tau = config["method"]["knobs"]["tau"]
    assert -1 <= tau <= 1 and config["method"]["calibration"]["knobs"] == {"tau": tau}
    assert "calibrated scissor tau=" in capsys.readouterr().out
    cached = list((cache_dir / "calibration").glob("scissor-*.json"))
    assert cached
    # same target again (another run id): the cached tau, no new bisection
    run_config(cfg_factory("+method=scissor", "retention=0.3", "task.limit=8", "run_id=again"))
    assert "calibrated scissor" not in capsys.readouterr().out


def test_bisection_finds_a_value_within_tolerance():
    value, achieved, trace = bisect_knob(lambda t: (t + 1) / 2, -1.0, 1.0, 0.37)
    assert abs(achieved - 0.37) <= TOLERANCE and abs((value + 1) / 2 - achieved) < 1e-12


def test_unreachable_targets_say_so():
    with pytest.raises(ConfigError, match="unreachable on this task; the method reaches 20.00%-50.00%"):
        bisect_knob(lambda t: 0.2 + 0.15 * (t + 1), -1.0, 1.0, 0.05)
    with pytest.raises(ConfigError, match="closest achievable mean retention is .* jumps past"):
        bisect_knob(lambda t: 0.1 if t < 0 else 0.5, -1.0, 1.0, 0.3)


def test_calibration_documents_are_taken_in_turn_from_a_groups_tasks():
    """A group (MVBench: 20 tasks) calibrates on all its tasks, first documents first (those
    evaluated under task.limit, which lmms_eval applies per task)."""
    class Task:
        def __init__(self, docs):
            self.eval_docs = docs

    tasks = {"a": Task(["a0", "a1", "a2"]), "b": Task(["b0"]), "c": Task(["c0", "c1"])}
    assert [doc for _, doc in _documents(tasks, 5)] == ["a0", "b0", "c0", "a1", "c1"]
    assert [doc for _, doc in _documents(tasks, 10)] == ["a0", "b0", "c0", "a1", "c1", "a2"]
    assert [task for task, _ in _documents(tasks, 2)] == [tasks["a"], tasks["b"]]
    assert [doc for _, doc in _documents({"one": Task(["x", "y", "z"])}, 2)] == ["x", "y"]
