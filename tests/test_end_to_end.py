"""The harness end to end: the README's commands in a subprocess, resume, and bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from harness.run.rundir import read_samples
from tests.helpers import REPO, run_config, smoke_defaults

pytestmark = pytest.mark.slow


def harness(*args, results, cache, check=True):
    env = {**os.environ, "VTC_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) go before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run([sys.executable, "-m", "harness", *flags, *smoke_defaults(overrides), *overrides,
                           f"results_dir={results}", "progress=false"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def only_run_dir(results):
    dirs = [p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "sweeps"]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_literal_command_writes_the_run(tmp_path, cache_dir, tiny_model_dir, smoke_questions):
    results = tmp_path / "results"
    proc = harness("+method=scissor", "tau=0.9", results=results, cache=cache_dir)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("[SMOKE: random model] smoke | tiny | scissor tau=0.9 | retention ")
    assert "24 samples, 0 failed" in line
    run_dir = only_run_dir(results)
    assert {"config.yaml", "config.json", "versions.json", "samples.jsonl", "summary.json"} <= {
        p.name for p in run_dir.iterdir()}
    records = read_samples(run_dir / "samples.jsonl")
    assert len(records) == 24 and all(r["status"] == "ok" for r in records)
    first = records[0]
    assert {"prediction", "target", "score", "retention", "timings"} <= set(first)
    assert 0 < first["retention"]["rho_tok"] <= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "scissor" and summary["knobs"]["tau"] == 0.9
    assert summary["score"] == pytest.approx(100 * sum(r["score"] for r in records) / 24)
    assert summary["live_score_mismatches"] == []  # live scores agree with lmms_eval's own
    versions = json.loads((run_dir / "versions.json").read_text())
    assert {"harness_git", "torch", "transformers", "lmms_eval"} <= set(versions)


def test_qwen2_5_vl_runs_end_to_end_and_its_rows_name_the_family(tmp_path, cache_dir, smoke_questions):
    """The small random Qwen2.5-VL through the literal CLI: a visual-stage and an LLM-stage method."""
    results = tmp_path / "results"
    proc = harness("-m", "model=qwen2_5_vl_small", "+method=none,fastv", "task.limit=2",
                   results=results, cache=cache_dir)
    summaries = [json.loads(p.read_text()) for p in results.glob("*/summary.json")]
    assert sorted(s["method"] for s in summaries) == ["fastv", "none"]
    assert all(s["family"] == "qwen2_5_vl" and s["n_failed"] == 0 for s in summaries)
    fastv = next(s for s in summaries if s["method"] == "fastv")
    assert 0 < fastv["retention"]["rho_tok"]["mean"] < 1
    table = next(results.glob("sweeps/**/table.md")).read_text()
    assert "| Family " in table and "qwen2_5_vl" in table and "qwen2_5_vl_small" in table
    assert "qwen2_5_vl_small | fastv" in proc.stdout


def test_multirun_writes_the_table(tmp_path, cache_dir, tiny_model_dir, smoke_questions):
    results = tmp_path / "results"
    proc = harness("-m", "+method=uniform", "retention=0.5,0.25", "task.limit=4",
                   results=results, cache=cache_dir)
    sweep = next((results / "sweeps").iterdir())
    for name in ("table.md", "table.tex", "table.csv"):
        assert (sweep / name).is_file()
    table = (sweep / "table.md").read_text()
    assert "uniform (r=0.5)" in table and "uniform (r=0.25)" in table
    assert "Smoke-MC" in table and "SMOKE setup" in table
    assert "\\toprule" in (sweep / "table.tex").read_text()
    assert "Sweep table" in proc.stdout


def test_rerun_resumes_without_recomputing(cfg_factory, capsys):
    cfg = cfg_factory("+method=uniform", "retention=0.25", "task.limit=6")
    run_dir = run_config(cfg)
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6
    # a crash after three samples: keep them, and a half-written fourth line
    (run_dir / "samples.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    run_config(cfg)
    after = (run_dir / "samples.jsonl").read_text().splitlines()
    assert after[:3] == lines[:3]  # untouched
    assert len(read_samples(run_dir / "samples.jsonl")) == 6  # three recomputed, not six
    run_config(cfg)  # complete: nothing recomputed, not even loaded
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == len(after)
    assert "(already complete)" in capsys.readouterr().out


def test_bad_videos_fail_their_sample_and_the_run_goes_on(cfg_factory, tmp_path, smoke_questions):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    rows = [json.loads(line) for line in smoke_questions.read_text().splitlines()[:3]]
    shutil.copy(smoke_questions.parent / rows[0]["video"], data / "videos" / "good.mp4")
    (data / "videos" / "corrupt.mp4").write_bytes(b"not a video" * 100)
    for row, name in zip(rows, ["good.mp4", "missing.mp4", "corrupt.mp4"]):
        row["video"] = str(data / "videos" / name)
    (data / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = run_config(cfg_factory(f"task.data_dir={data}"))
    records = {r["doc_id"]: r for r in read_samples(run_dir / "samples.jsonl")}
    assert records[0]["status"] == "ok"
    assert records[1]["status"] == "failed" and "video file not found" in records[1]["reason"]
    assert records[2]["status"] == "failed" and "cannot decode video" in records[2]["reason"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_failed"] == 2 and summary["n_samples"] == 3


@pytest.mark.parametrize("args, message", [
    (["+method=scisor"], "Could not find 'method/scisor'"),
    (["model=llava_ov_13b"], "Could not find 'model/llava_ov_13b'"),
    (["task=nosuch"], "Could not find 'task/nosuch'"),
    (["+method=scissor", "tau=1.5"], "error: scissor.tau=1.5: expected a value in [-1"),
    (["+method=uniform", "retention=0"], "error: uniform.retention=0"),
    (["model=llava_ov_0.5b", "model.path=/nonexistent/llava"], "error: model.path=/nonexistent/llava: no such directory"),
])
def test_bad_input_is_one_clear_error(args, message, tmp_path, cache_dir):
    proc = harness(*args, results=tmp_path / "results", cache=cache_dir, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_wandb_logs_offline(cfg_factory, tmp_path):
    run_dir = run_config(cfg_factory("+method=uniform", "retention=0.5", "task.limit=2", "logger=wandb"))
    offline = list((run_dir.parent / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))  # the run's data file, ready for `wandb sync`


def test_smoke_sweep_end_to_end_with_table_plots_and_wandb(tmp_path, cache_dir, tiny_model_dir,
                                                           smoke_questions):
    import yaml

    results = tmp_path / "results"
    # every method of the smoke sweep, at one of its targets (the command line overrides its grid)
    proc = harness("-m", "+sweep=smoke", "retention=0.25", "model=tiny", "task=smoke", "task.limit=2",
                   "logger=wandb", results=results, cache=cache_dir)
    params = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())["hydra"]["sweeper"]["params"]
    names, targets = params["+method"].split(","), ["0.25"]
    sweep = next((results / "sweeps").iterdir())
    table = (sweep / "table.md").read_text()
    errors = (sweep / "errors.txt").read_text().splitlines() if (sweep / "errors.txt").is_file() else []
    # every point either has its row or is listed, with its reason, as unreachable
    for name in names:
        for target in (targets if name != "none" else [None]):
            row = f"| {name}" if target is None else f"| {name} (r={float(target):g}"
            listed = [line for line in errors if re.search(rf"\+method={name}[\s:]", line)
                      and re.search(rf"retention={target}[\s:]", line)]
            assert (row in table) != bool(listed), (name, target, errors)
            assert all("unreachable" in line for line in listed), listed
    assert len(errors) < len(names) * len(targets) // 2  # most points run
    for name in ("accuracy_vs_rho_tok", "accuracy_vs_rho_flops", "cost_breakdown"):
        assert (sweep / f"{name}.png").is_file() and (sweep / f"{name}.pdf").is_file()
    runs = [p for p in results.iterdir() if p.is_dir() and (p / "summary.json").is_file()]
    assert len(runs) == table.count("| tiny ")  # one table row per finished run
    offline = list((results / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == len(runs) + 1  # each run + the sweep's study run
    assert "Sweep table" in proc.stdout
