"""Contracts of the lmms_eval internals the harness relies on (harness/lmms_compat.py), and the
`vtc` model built from lmms_eval's own command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.lmms_compat import group_scores, is_mean, leaf_tasks, score_one, task_config

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "harness" / "data" / "lmms_tasks"


@pytest.fixture(scope="module")
def manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=str(TASKS))


@pytest.fixture(scope="module")
def smoke_task(manager, smoke_questions):
    from lmms_eval.tasks import get_task_dict

    spec = {"task": "vtc_smoke_mc", "dataset_kwargs": {"data_files": {"test": str(smoke_questions)}}}
    return dict(leaf_tasks(get_task_dict([spec], manager)))["vtc_smoke_mc"]


@pytest.mark.slow
def test_score_one_applies_the_task_filters_then_process_results(smoke_task):
    doc = smoke_task.eval_docs[0]
    assert len(smoke_task._filters) >= 1 and hasattr(smoke_task._filters[0], "apply")  # the private API
    right, wrong = doc["answer"], next(c for c in "ABCD" if c != doc["answer"])
    assert score_one(smoke_task, doc, f" {right}. because") == {"accuracy": 1.0}
    assert score_one(smoke_task, doc, wrong) == {"accuracy": 0.0}


def test_task_config_is_the_raw_yaml(manager):
    config = task_config(manager, "vtc_smoke_mc")
    assert config["dataset_path"] == "json" and config["output_type"] == "generate_until"


@pytest.mark.slow
def test_leaf_tasks_unpacks_groups(manager, smoke_questions, tmp_path, monkeypatch):
    from lmms_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(smoke_questions.parent)  # the task's data_files is relative

    (tmp_path / "group.yaml").write_text("group: vtc_contract_group\ntask:\n  - vtc_smoke_mc\n")
    grouped = TaskManager(verbosity="ERROR", include_path=[str(TASKS), str(tmp_path)])
    task_dict = get_task_dict(["vtc_contract_group"], grouped)
    leaves = dict(leaf_tasks(task_dict))
    assert list(leaves) == ["vtc_smoke_mc"]
    assert type(leaves["vtc_smoke_mc"]).__name__ == "ConfigurableTask"
    assert isinstance(next(iter(task_dict.values())), dict)  # a group nests its tasks


@pytest.mark.slow
@pytest.mark.parametrize("weighted, expected", [(False, (0.5 + 1.0) / 2), (True, (0.5 * 2 + 1.0 * 6) / 8)])
def test_group_scores_aggregates_a_groups_tasks_by_its_config(smoke_questions, tmp_path, monkeypatch,
                                                              weighted, expected):
    from lmms_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(smoke_questions.parent)  # the tasks' data_files is relative
    (tmp_path / "vtc_copy.yaml").write_text(f"include: {TASKS}/vtc_smoke/vtc_smoke_mc.yaml\ntask: vtc_copy_mc\n")
    (tmp_path / "group.yaml").write_text(
        "group: vtc_contract_group\ntask:\n  - vtc_smoke_mc\n  - vtc_copy_mc\naggregate_metric_list:\n"
        f"  - metric: accuracy\n    aggregation: mean\n    weight_by_size: {str(weighted).lower()}\n")
    task_dict = get_task_dict(["vtc_contract_group"], TaskManager(verbosity="ERROR", include_path=[str(TASKS), str(tmp_path)]))
    per_task = {"vtc_smoke_mc": {"alias": "vtc_smoke_mc", "accuracy,none": 0.5, "accuracy_stderr,none": "N/A", "samples": 2},
                "vtc_copy_mc": {"alias": "vtc_copy_mc", "accuracy,none": 1.0, "accuracy_stderr,none": "N/A", "samples": 6}}
    merged = group_scores(per_task, task_dict)
    assert merged["vtc_contract_group"]["accuracy,none"] == pytest.approx(expected)
    assert merged["vtc_smoke_mc"]["accuracy,none"] == 0.5  # the leaves as given


def test_is_mean_recognises_the_registered_mean_only(smoke_task):
    import statistics

    assert is_mean(smoke_task.aggregation()["accuracy"])
    assert not is_mean(statistics.median) and not is_mean(None)


@pytest.mark.slow
def test_lmms_eval_cli_builds_the_vtc_model(tiny_model_dir, smoke_questions, tmp_path):
    """`python -m lmms_eval --model vtc --model_args pretrained=...,method=...,knob=...` runs the
    harness's model and writes its per-sample records."""
    records = tmp_path / "records"
    args = [sys.executable, "-m", "lmms_eval", "--model", "vtc", "--model_args",
            f"pretrained={tiny_model_dir},method=uniform,retention=0.25,frames=4,dtype=float32,"
            f"output={records}", "--tasks", "vtc_smoke_mc", "--include_path", str(TASKS),
            "--limit", "3", "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # the task's data_files is relative: run where the generated questions are
    proc = subprocess.run(args, cwd=smoke_questions.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in (records / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(r["status"] == "ok" for r in lines)
    assert all(r["tokens"]["video_out"] == 4 * 49 for r in lines)  # uniform at 25 %: 7x7 per frame
    assert json.loads((records / "config.json").read_text())["method"] == "uniform"
    assert "vtc_smoke_mc" in proc.stdout


def test_cli_rejects_pipelines_and_missing_paths():
    from harness.run.requests import VTCModel

    with pytest.raises(ValueError, match="needs pretrained="):
        VTCModel.create_from_arg_string("method=uniform")
    with pytest.raises(ValueError, match="method=pipeline cannot be given"):
        VTCModel.create_from_arg_string("pretrained=x,method=pipeline")


@pytest.mark.slow
def test_logged_samples_carry_their_documents(cfg_factory):
    """`logged_doc` reads the document lmms_eval logs with each sample: a run broken down by a
    document field (task.breakdown) counts every sample under its field's value."""
    from harness.errors import ConfigError
    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("task.limit=4", "task.breakdown=kind"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["score_by"]) <= {"colour", "direction"}
    assert sum(part["n"] for part in summary["score_by"].values()) == 4
    with pytest.raises(ConfigError, match="task.breakdown=nope: document 0 of vtc_smoke_mc has no field 'nope'"):
        run_config(cfg_factory("task.limit=4", "task.breakdown=nope"))
