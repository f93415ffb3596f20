"""The seven paper benchmarks through lmms_eval's OWN task code, offline, with the tiny model.

Each benchmark gets a small stand-in of its dataset (tests/helpers/benchmarks.py): the real
columns and config, generated clips where the task's utils.py looks for videos, and one bad video.
MVBench is lmms_eval's group of 20 tasks (one dataset config each), run as one harness run and
scored by the group's aggregate; LongVideoBench is broken down by duration group.
ActivityNet-QA's GPT judge is a local HTTP server speaking the OpenAI chat-completions API, reached
through the same environment variables and client code as the real one.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.data.tasks import load_tasks
from harness.errors import ConfigError
from harness.lmms_compat import score_one
from harness.report.summary import breakdown, to_100, with_group_scores
from harness.report.tables import write_tables
from tests.helpers import REPO, job_of, make_cfg, run_config
from tests.helpers.benchmarks import LVB_GROUPS, LVB_ROWS, MVBENCH_CONFIGS, MVBENCH_ROWS, write_benchmark

pytestmark = pytest.mark.slow

# what each conf/task/<name>.yaml must declare: lmms_eval task, metric, native scale, table label
DECLARED = {
    "videomme": ("videomme", "videomme_perception_score", 100.0, "VideoMME"),
    "mlvu": ("mlvu_dev", "mlvu_percetion_score", 100.0, "MLVU"),
    "egoschema": ("egoschema_subset", "score", 1.0, "EgoSchema"),
    "nextqa": ("nextqa_mc_test", "exact_match", 1.0, "NExT-QA"),
    "activitynetqa": ("activitynetqa", "gpt_eval_accuracy", 100.0, "ActivityNet-QA"),
    "mvbench": ("mvbench", "mvbench_accuracy", 100.0, "MVBench"),
    "longvideobench": ("longvideobench_val_v", "lvb_acc", 1.0, "LongVideoBench"),
}
MULTIPLE_CHOICE = ["videomme", "mlvu", "egoschema", "nextqa"]
# Scripted answers right, right, wrong, wrong, scored by lmms_eval's own parsing and aggregation:
# 50 on 0-100, except MLVU, whose score is the mean over its 7 task types, the absent ones
# counting 0 (the four rows have types plotQA, needle, ego, count): (100 + 100 + 0 + 0) / 7.
SCRIPTED_SCORE = {"videomme": 50.0, "mlvu": 200 / 7, "egoschema": 50.0, "nextqa": 50.0}
JUDGE = "fake-judge-0001"
JUDGE_SAYS_YES = {"red", "blue"}  # the correct answers of rows 0 and 2 (rows 1 and 3: green)


class FakeJudge(ThreadingHTTPServer):
    """POST /v1/chat/completions -> {'pred': 'yes'|'no', 'score': 4|0}, as lmms_eval parses it."""

    def __init__(self):
        self.requests: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):
                body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                self.requests.append({"path": handler.path, "auth": handler.headers.get("Authorization"),
                                      "model": body["model"], "prompt": prompt})
                correct = re.search(r"Correct Answer: (.*)\n", prompt).group(1)
                verdict = "{'pred': 'yes', 'score': 4}" if correct in JUDGE_SAYS_YES \
                    else "{'pred': 'no', 'score': 0}"
                reply = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": verdict}}]})
                handler.send_response(200 if handler.path == "/v1/chat/completions" else 404)
                handler.send_header("Content-Type", "application/json")
                handler.end_headers()
                handler.wfile.write(reply.encode())

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/chat/completions"


@pytest.fixture
def fake_judge(monkeypatch):
    server = FakeJudge()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_API_URL", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _restore_environment():
    """load_tasks exports task.env (HF_HOME, MODEL_VERSION) to os.environ: undo it after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def benchmark_cfg(cfg_factory, tmp_path):
    """(cfg, fixture) for a benchmark's four-row stand-in, with the tiny model at 4 frames."""
    def make(name, *overrides):
        fx = write_benchmark(name, tmp_path / "fixture")
        cfg = cfg_factory(f"task={name}", "model.frames=4", *fx["overrides"], *overrides)
        return cfg, fx
    return make


def _aggregate(task, metric, per_sample):
    fn = task.aggregation()[metric]
    return fn(per_sample, args=None) if "args" in inspect.signature(fn).parameters else fn(per_sample)


@pytest.mark.parametrize("name", list(DECLARED))
def test_task_config_declares_label_metric_scale(name, benchmark_cfg):
    cfg, _ = benchmark_cfg(name)
    assert (cfg.task.lmms_task, cfg.task.metric, cfg.task.scale, cfg.task.label) == DECLARED[name]
    assert cfg.task.env.HF_HOME  # lmms_eval's utils find the videos under it


@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
def test_lmms_eval_prompt_parsing_and_scale(name, benchmark_cfg):
    """lmms_eval's own prompt, visual path, answer parsing and aggregation on the stand-in data;
    the declared scale turns the aggregated value into the expected 0-100 score."""
    cfg, fx = benchmark_cfg(name)
    (task,) = load_tasks(job_of(cfg).task).values()
    docs = list(task.test_docs())
    assert len(docs) == len(fx["rows"])
    prompt = task.doc_to_text(docs[0])
    for option in fx["truths"][:1] + [o for o in docs[0].get("options", [])]:
        assert option in prompt
    assert "colour is the moving square" in prompt.lower()
    assert task.doc_to_visual(docs[0]) == [str(fx["videos"][0])]

    letters = [_answer_letter(name, doc) for doc in docs]
    wrong = [next(x for x in "ABCD" if x != letter) for letter in letters]
    responses = [letters[0], f"({letters[1]}) {fx['truths'][1]}", wrong[2], wrong[3]]
    per_sample = [score_one(task, doc, r)[cfg.task.metric] for doc, r in zip(docs, responses)]
    native = _aggregate(task, cfg.task.metric, per_sample)
    assert to_100(native, cfg.task.scale, name) == pytest.approx(SCRIPTED_SCORE[name])


def _answer_letter(name, doc) -> str:
    answer = doc["answer"]
    return "ABCDE"[int(answer)] if name in ("egoschema", "nextqa") else answer


@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
def test_benchmark_runs_end_to_end(name, benchmark_cfg):
    """The tiny model through the real task: every sample recorded, the bad video one failed
    sample (with its id and reason), lmms_eval's score normalised to 0-100, the table marked."""
    cfg, fx = benchmark_cfg(name)
    run_dir = run_config(cfg)
    _check_run(cfg, fx, run_dir)


def test_activitynetqa_runs_with_the_judge(benchmark_cfg, fake_judge):
    cfg, fx = benchmark_cfg("activitynetqa", f"task.judge={JUDGE}")  # reaches lmms_eval's client
    assert not cfg.task.live_score
    run_dir = run_config(cfg)
    summary = _check_run(cfg, fx, run_dir)
    # the judge was asked once per sample, by lmms_eval's client, with our model name and key
    assert len(fake_judge.requests) == len(fx["rows"])
    assert {r["model"] for r in fake_judge.requests} == {JUDGE}
    assert {r["auth"] for r in fake_judge.requests} == {"Bearer test-key"}
    records = {r["doc_id"]: r for r in _records(run_dir)}
    asked = [re.search(r"Predicted Answer: (.*)\n\nProvide", r["prompt"], re.DOTALL).group(1)
             for r in fake_judge.requests]
    assert sorted(asked) == sorted(r["prediction"] or "" for r in records.values())
    # rows 0 and 2 judged correct, rows 1 and 3 (3: the failed sample) not
    assert summary["metric_native"] == pytest.approx(50.0) and summary["score"] == pytest.approx(50.0)
    assert summary["judge"] == JUDGE
    table = write_tables([summary], run_dir / "table")
    assert f"ActivityNet-QA is scored by a GPT judge: {JUDGE}" in table


def test_activitynetqa_without_key_stops_before_any_sample(benchmark_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg, _ = benchmark_cfg("activitynetqa")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        run_config(cfg)
    assert not list((tmp_path / "results").glob("*/samples.jsonl"))


def _records(run_dir):
    from harness.run.rundir import read_samples
    return read_samples(run_dir / "samples.jsonl")


def _check_run(cfg, fx, run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    lmms_task, metric, scale, label = DECLARED[cfg.task.name]
    assert summary["lmms_task"] == lmms_task and summary["task_label"] == label
    assert summary["metric"].split(",")[0] == metric and summary["scale"] == scale
    assert summary["score"] == pytest.approx(100 * summary["metric_native"] / scale)
    assert 0 <= summary["score"] <= 100
    low, high = summary["score_ci95"]  # bootstrapped through the task's own aggregation
    assert 0 <= low <= high <= 100
    assert summary["n_samples"] == len(fx["rows"]) and summary["n_failed"] == 1
    (failed,) = summary["failed"]
    # the sample's id: its lmms_eval task (a group's: the task of the row's config) and doc id
    leaf = {None: lmms_task}.get(fx["bad_config"]) or f"{lmms_task}_{fx['bad_config']}"
    assert failed["key"].startswith(f"{leaf}/{fx['bad_doc_id']}/")
    video = str(fx["videos"][-1])
    if fx["bad_video"] == "missing":  # stopped by the task's utils.py, or by the harness's reader
        assert ("does not exist" in failed["reason"] or "video file not found" in failed["reason"])
        assert os.path.splitext(video)[0] in failed["reason"]
    else:
        assert "cannot decode video" in failed["reason"]
    records = {(r["task"], r["doc_id"]): r for r in _records(run_dir)}
    expected = [({None: lmms_task}.get(c) or f"{lmms_task}_{c}", i) for c, i in fx["docs"]]
    assert sorted(records) == sorted(expected)
    assert all(records[k]["status"] == "ok" for k in expected[:-1]) and records[expected[-1]]["status"] == "failed"
    first = records[expected[0]]
    assert first["frames"] == 4 and 0 < first["retention"]["rho_tok"] <= 1
    table = write_tables([summary], run_dir / "table")
    assert label in table and "*" in table.split("\n")[2]  # the benchmark's cell marks failures
    return summary


def test_missing_data_is_one_clear_error(tmp_path, cache_dir):
    """No dataset and no videos on disk, offline: one `error:` line naming the dataset, where the
    videos were looked for, and how to get them; no traceback, nothing run."""
    env = {**os.environ, "VTC_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "empty_hf_home")}
    proc = subprocess.run([sys.executable, "-m", "harness", "model=tiny", "task=nextqa", f"results_dir={tmp_path / 'r'}",
                           "progress=false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert "lmms-eval/NExTQA (config MC)" in line
    assert f"videos expected under {tmp_path / 'empty_hf_home' / 'nextqa'}" in line
    assert "hf download --repo-type dataset lmms-eval/NExTQA" in line and "HF_HOME" in line


def test_paper_config_shows_without_loading_anything(tmp_path):
    """The README's `--cfg job` command prints the resolved setting with no weights or data."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness", "model=llava_ov_7b", "task=videomme",
                           "+method=scissor", "tau=0.9", "--cfg", "job", "--resolve"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "path: llava-hf/llava-onevision-qwen2-7b-ov-hf" in proc.stdout
    assert "lmms_task: videomme" in proc.stdout and "metric: videomme_perception_score" in proc.stdout
    assert "frames: 32" in proc.stdout and "dtype: bfloat16" in proc.stdout
    assert "tau: 0.9" in proc.stdout


# ---- MVBench (an lmms_eval group) and LongVideoBench (broken down by duration group) --------------
def _letter(doc) -> str:
    """The correct option's letter of an MVBench (answer text) or LongVideoBench (index) document."""
    if "candidates" in doc and "correct_choice" not in doc:
        return "ABCDE"[doc["candidates"].index(doc["answer"])]
    return "ABCDE"[doc["correct_choice"]]


def test_mvbench_prompt_parsing_and_group_score(benchmark_cfg):
    """lmms_eval's group `mvbench` loads as its 20 tasks, each reading its own config; their prompt,
    video path and answer parsing; the score is the group's aggregate (the mean of the 20 task
    accuracies) computed by lmms_eval's group code, not the pooled accuracy."""
    cfg, fx = benchmark_cfg("mvbench")
    task_conf = job_of(cfg).task
    tasks = load_tasks(task_conf)
    assert list(tasks) == [f"mvbench_{c}" for c in MVBENCH_CONFIGS]
    docs = {leaf: list(task.test_docs()) for leaf, task in tasks.items()}
    for k, config in enumerate(MVBENCH_CONFIGS):
        rows = fx["rows"][k * MVBENCH_ROWS:(k + 1) * MVBENCH_ROWS]
        assert docs[f"mvbench_{config}"] == rows
    task, doc = tasks["mvbench_moving_count"], docs["mvbench_moving_count"][0]
    prompt = task.doc_to_text(doc)
    assert prompt.startswith("Question:What colour is the moving square?\nOption:\n")
    assert all(f"({'ABCD'[k]}) {o}\n" in prompt for k, o in enumerate(doc["candidates"]))
    assert prompt.endswith("Only give the best option.\n")
    assert task.doc_to_visual(doc) == [str(fx["videos"][MVBENCH_ROWS])]  # clevrer/video_validation/...

    # process_results: a right answer (bare letter, "(X) text"), a wrong one, and an empty one,
    # which lmms_eval's MVBench accuracy leaves out instead of counting wrong
    right, wrong = _letter(doc), next(x for x in "ABCD" if x != _letter(doc))
    assert score_one(task, doc, right)["mvbench_accuracy"]["score"] == 1
    assert score_one(task, doc, f"({right}) {doc['answer']}")["mvbench_accuracy"]["score"] == 1
    assert score_one(task, doc, wrong)["mvbench_accuracy"]["score"] == 0
    # every task: its first question right; its second wrong (odd tasks) or unanswered (even ones)
    per_task = {}
    for k, (leaf, leaf_docs) in enumerate(docs.items()):
        first, second = leaf_docs
        responses = [_letter(first), next(x for x in "ABCD" if x != _letter(second)) if k % 2 else ""]
        values = [score_one(tasks[leaf], d, r)["mvbench_accuracy"] for d, r in zip(leaf_docs, responses)]
        per_task[leaf] = {"alias": leaf, "mvbench_accuracy,none": _aggregate(tasks[leaf], "mvbench_accuracy", values),
                          "mvbench_accuracy_stderr,none": "N/A", "samples": 2}
    assert {v["mvbench_accuracy,none"] for v in per_task.values()} == {100.0, 50.0}
    group = with_group_scores({"results": per_task}, task_conf, tasks)["mvbench"]["mvbench_accuracy,none"]
    assert to_100(group, cfg.task.scale, "mvbench") == pytest.approx(75.0)  # the mean of 100s and 50s
    # (the pooled accuracy over answered questions would be 20 / 30)


def test_longvideobench_prompt_parsing_scale_and_duration_groups(benchmark_cfg):
    """lmms_eval's longvideobench_val_v: its prompt (4 or 5 options), video path, letter parsing and
    aggregation on 0-1; the breakdown scores each duration group by that aggregation."""
    cfg, fx = benchmark_cfg("longvideobench")
    task_conf = job_of(cfg).task
    (task,) = load_tasks(task_conf).values()
    docs = list(task.test_docs())
    assert docs == fx["rows"]
    five, four = docs[0], docs[1]
    for doc in (five, four):
        prompt = task.doc_to_text(doc)
        assert prompt.startswith("What colour is the moving square?\nA. ")
        assert all(f"{'ABCDE'[k]}. {o}" in prompt for k, o in enumerate(doc["candidates"]))
        assert prompt.endswith("Answer with the option's letter from the given choices directly.\n")
    assert "E. " in task.doc_to_text(five) and "E. " not in task.doc_to_text(four)  # option4 "N/A"
    assert task.doc_to_visual(five) == [str(fx["videos"][0])]

    # right in the two short duration groups (three answer forms), wrong in the two long ones
    forms = ["{}", "The best answer is {}.", "({}) " + "x"]
    responses = [forms[i % 3].format(_letter(d)) if d["duration_group"] in (15, 60)
                 else next(x for x in "ABCD" if x != _letter(d)) for i, d in enumerate(docs)]
    values = [score_one(task, d, r)["lvb_acc"] for d, r in zip(docs, responses)]
    assert [v["parsed_pred"] == v["answer"] for v in values] == [d["duration_group"] in (15, 60) for d in docs]
    assert to_100(_aggregate(task, "lvb_acc", values), cfg.task.scale, "longvideobench") == pytest.approx(50.0)
    logged = [{"doc_id": i, "doc": d, "lvb_acc": v} for i, (d, v) in enumerate(zip(docs, values))]
    by = breakdown(task_conf, 0, logged, task)
    assert {g: (v["score"], v["n"]) for g, v in by.items()} == {
        "15": (100.0, LVB_ROWS), "60": (100.0, LVB_ROWS), "600": (0.0, LVB_ROWS), "3600": (0.0, LVB_ROWS)}


def test_mvbench_runs_end_to_end_as_one_group(benchmark_cfg, capsys):
    """The tiny model through lmms_eval's 20 MVBench tasks in one run: the score is the group's
    aggregate (the mean of the task scores lmms_eval reports), broken down by task in summary.json,
    the summary line and the table."""
    cfg, fx = benchmark_cfg("mvbench")
    run_dir = run_config(cfg)
    summary = _check_run(cfg, fx, run_dir)
    assert summary["breakdown_field"] == "lmms_task"
    assert list(summary["score_by"]) == list(MVBENCH_CONFIGS)
    assert all(part["n"] == MVBENCH_ROWS for part in summary["score_by"].values())
    reported = json.loads((run_dir / "lmms_eval_results.json").read_text())["results"]
    for config, part in summary["score_by"].items():  # each task's score is lmms_eval's own
        assert part["score"] == pytest.approx(reported[f"mvbench_{config}"]["mvbench_accuracy,none"])
    assert summary["score"] == pytest.approx(sum(p["score"] for p in summary["score_by"].values()) / 20)
    line = next(x for x in capsys.readouterr().out.splitlines() if " | tiny | none | " in x)
    assert "] mvbench | tiny | none |" in line and "(action_sequence " in line
    print(line)
    table = write_tables([summary], run_dir / "table2")
    header = table.splitlines()[0]
    assert all(f"MVBench: {c}" in header for c in MVBENCH_CONFIGS)


def test_longvideobench_runs_end_to_end_by_duration_group(benchmark_cfg, capsys):
    cfg, fx = benchmark_cfg("longvideobench")
    run_dir = run_config(cfg)
    summary = _check_run(cfg, fx, run_dir)
    assert summary["breakdown_field"] == "duration_group"
    assert list(summary["score_by"]) == [str(g) for g in LVB_GROUPS]
    assert all(part["n"] == LVB_ROWS for part in summary["score_by"].values())
    # the accuracy over all questions is the mean of the equal-sized groups' accuracies
    assert summary["score"] == pytest.approx(sum(p["score"] for p in summary["score_by"].values()) / 4, abs=1e-3)
    line = next(x for x in capsys.readouterr().out.splitlines() if " | tiny | none | " in x)
    assert "] longvideobench | tiny | none |" in line and "(15 " in line
    print(line)
    header = write_tables([summary], run_dir / "table2").splitlines()[0]
    assert all(f"LongVideoBench: {g}" in header for g in LVB_GROUPS)


@pytest.mark.parametrize("name, dataset, videos, extra", [
    ("mvbench", "OpenGVLab/MVBench", "mvbench_video", "--revision video"),
    ("longvideobench", "longvideobench/LongVideoBench", "datasets/longvideobench", ""),
])
def test_missing_data_of_new_benchmarks_is_one_clear_error(name, dataset, videos, extra, tmp_path, monkeypatch):
    """No dataset and no videos on disk, offline: load_tasks stops with one line naming the dataset,
    where the videos were looked for and how to get them (in process: lmms_eval's retries of the
    download are switched off, the hub's cache is the empty one)."""
    import datasets
    import huggingface_hub.constants
    from lmms_eval.api.task import ConfigurableTask

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(ConfigurableTask.download.retry, "enabled", False)
    cfg = make_cfg(f"task={name}", f"task.env.HF_HOME={tmp_path / 'empty_hf_home'}",
                   results_dir=tmp_path / "r", cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError) as err:
        load_tasks(job_of(cfg).task)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"task={name}: the data of lmms_eval ")
    assert f"dataset {dataset}" in line
    assert f"videos expected under {tmp_path / 'empty_hf_home' / videos}" in line
    assert f"hf download --repo-type dataset {dataset}{' ' + extra if extra else ''}`" in line
    if name == "mvbench":
        assert "group mvbench (20 tasks, one config each)" in line
