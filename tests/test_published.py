"""Published numbers beside ours, and the hard-subset view: the data file is well formed, a run finds
exactly the published rows of its model, benchmark, method and retention with the setting
differences named, and a method's hard-subset score is its score on the baseline's wrong answers."""

import json

import pandas as pd
import pytest

from harness import table
from harness.report.hard_subset import hard_subset
from harness.report.published import (beside_published, beside_table, load_published, matches,
                                      published_table, same_weights)


def run_summary(method, score, *, model="llava_ov_7b", task="VideoMME", retention=None, frames=32,
                path="llava-hf/llava-onevision-qwen2-7b-ov-hf", results_dir=None, setting="s"):
    return {"method": method, "model": model, "task_label": task, "lmms_task": task.lower(), "score": score,
            "requested_retention": retention, "label": "" if retention is None else f"r={retention}",
            "retention": {"rho_tok": {"mean": retention or 1.0}}, "frames": frames, "model_path": path,
            "limit": None, "run_id": f"{method}-{retention}", "setting": setting, "scale": 1.0,
            "results_dir": results_dir}


def test_every_published_row_is_complete_and_on_the_0_100_scale():
    frame = load_published()
    assert len(frame) > 300
    assert frame.source.notna().all() and (frame.source.str.len() > 10).all()
    assert frame.score.between(0, 100).all()
    assert frame.retention.dropna().between(0, 1, inclusive="right").all()
    card = frame[(frame.model == "llava_ov_7b") & (frame.method == "none") & (frame.benchmark == "VideoMME")
                 & (frame.checkpoint == "lmms-lab/llava-onevision-qwen2-7b-ov")]
    assert 58.2 in card.score.round(1).tolist()  # the model card's anchor


def test_llava_hf_conversions_are_the_same_weights():
    assert same_weights("llava-hf/llava-onevision-qwen2-7b-ov-hf", "lmms-lab/llava-onevision-qwen2-7b-ov")
    assert not same_weights("llava-hf/llava-onevision-qwen2-7b-ov-hf", "BBBBCHAN/LLaVA-Scissor-baseline-7B")
    assert not same_weights("llava-hf/llava-onevision-qwen2-7b-ov-hf", None)


def test_a_run_matches_its_model_benchmark_method_and_retention_only():
    frame = load_published()
    found = matches(run_summary("fastv", 50.0, retention=0.25), frame)
    assert not found.empty
    assert set(found.method) == {"fastv"} and set(found.benchmark) == {"VideoMME"}
    assert (found.retention - 0.25).abs().max() <= 0.02
    assert set(found.model) <= {"llava_ov_7b", "llava_ov"}
    assert matches(run_summary("fastv", 50.0, retention=0.6), frame).empty  # no published FastV at 60%
    none = matches(run_summary("none", 58.0), frame)
    assert not none.empty and none.retention.isna().all()
    assert matches(run_summary("none", 90.0, model="micro", task="Synthetic-MC"), frame).empty


def test_beside_published_gives_the_difference_and_what_differs():
    frame = load_published()
    rows, unmatched = beside_published([run_summary("none", 60.0), run_summary("none", 99.0, model="micro",
                                                                                 task="Synthetic-MC")], frame)
    assert [s["model"] for s in unmatched] == ["micro"]
    card = rows[rows.source.str.contains("model card|model-index", case=False)]
    row = card[card.published.round(1) == 58.2].iloc[0]
    assert row.difference == pytest.approx(60.0 - 58.2)
    assert "checkpoint" not in row.differences  # the llava-hf conversion is the model card's checkpoint
    scissor = rows[rows.source.str.contains("Scissor")]
    assert not scissor.empty and scissor.differences.str.contains("BBBBCHAN").all()
    text = beside_table(rows, unmatched, frame)
    assert "58.2" in text and "+1.8" in text and "No published number for: micro/Synthetic-MC/none" in text


def test_published_command_prints_the_filtered_rows(capsys):
    assert table.main(["--published", "--model", "llava_ov_7b", "--method", "none", "--benchmark", "nextqa"]) == 0
    out = capsys.readouterr().out
    assert "NExT-QA" in out and "79.4" in out and "VideoMME" not in out
    assert published_table(load_published().iloc[:0]) == "No published rows match."


def write_run(root, name, method, retention, scores: dict[str, float]):
    run = root / name
    run.mkdir()
    with (run / "samples.jsonl").open("w") as f:
        for key, score in scores.items():
            f.write(json.dumps({"key": key, "status": "ok", "score": score}) + "\n")
    return {**run_summary(method, 100 * sum(scores.values()) / len(scores), retention=retention,
                          results_dir=str(run)), "task_label": "Synthetic-MC", "model": "micro"}


def test_hard_subset_scores_a_method_on_the_baselines_wrong_answers(tmp_path):
    keys = [f"q{i}" for i in range(10)]
    uniform = write_run(tmp_path, "u", "uniform", 0.25, {k: float(i >= 4) for i, k in enumerate(keys)})
    other = write_run(tmp_path, "o", "scissor", 0.25, {k: float(i % 2 == 0) for i, k in enumerate(keys)})
    lonely = write_run(tmp_path, "l", "scissor", 0.1, {k: 1.0 for k in keys})
    frame = hard_subset([uniform, other, lonely], "uniform").set_index("retention")
    assert frame.loc[0.25, "hard_n"] == 4  # uniform gets q0..q3 wrong
    assert frame.loc[0.25, "hard_score"] == pytest.approx(50.0)  # scissor answers q0, q2 of them
    assert frame.loc[0.25, "score"] == pytest.approx(50.0)
    assert pd.isna(frame.loc[0.1, "baseline_run"]) and pd.isna(frame.loc[0.1, "hard_n"])  # no uniform at 10%
