"""Nothing stale, nothing clobbered: calibration tied to its data, the device checked up front,
unreachable targets refused alike, one writer per run directory, torn files recovered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import methods
from harness.errors import ConfigError
from harness.run.calibrate import CalibrationSet, reachable
from harness.run.rundir import RunDir, RunDirBusy, drop_torn_tail, read_samples
from methods.core.base import VisualInput
from tests.helpers import REPO, job_of, make_cfg, only_run_dir, smoke_defaults


# ---- the device, first ------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_a_cuda_device_that_is_not_there_stops_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="model.device=cuda: no CUDA device is visible"):
        job_of(make_cfg("model.device=cuda", results_dir=tmp_path, cache_dir=tmp_path))
    with pytest.raises(ConfigError, match="model.device=cuda:1: no CUDA device is visible"):
        job_of(make_cfg("model.device=cuda:1", results_dir=tmp_path, cache_dir=tmp_path))


def test_device_and_dtype_are_part_of_the_run_identity(tmp_path, monkeypatch):
    from harness.run import identity

    def rid(*overrides):
        return identity.run_id(job_of(make_cfg(*overrides, results_dir=tmp_path, cache_dir=tmp_path)))

    base = rid("+method=uniform")
    assert rid("+method=uniform", "model.dtype=bfloat16") != base
    monkeypatch.setattr("harness.models.base.resolve_device", lambda device: torch.device("cuda"))
    assert rid("+method=uniform") != base  # the same setting on a GPU is another run


# ---- unreachable targets -------------------------------------------------------------------------
def calibration(frames=8, tokens=64, dim=16, videos=3) -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    visual = [VisualInput(torch.randn(frames, tokens, dim, generator=g), (8, tokens // 8),
                          patch_scores=torch.rand(frames, tokens * 4, generator=g),
                          patch_keys=torch.randn(frames, tokens * 4, 4, generator=g)) for _ in range(videos)]
    return CalibrationSet([20] * videos, [frames * tokens] * videos, visual)


@pytest.mark.parametrize("name, floor", [("vidcom2", "frame"), ("topk", "frame"), ("visionzip", "frame"),
                                         ("uniform", "video"), ("divprune", "video")])
def test_a_target_below_a_direct_knobs_floor_is_the_same_unreachable_error(name, floor):
    """At least one token per frame is a floor: below it a directly set knob refuses with the line a
    calibrated knob gives, naming the reachable range. (Uniform pools frames in time and DivPrune
    selects over the whole video: their floor, one token per video, is within the window.)"""
    compressor = methods.build(name).with_knob("retention", 0.0001)
    data = calibration()
    if floor == "video":  # 1/512 of the tokens is within the +-1 point window of 0.0001
        reachable(compressor, 0.0001, data)
        return
    with pytest.raises(ConfigError, match=rf"retention=0.0001: unreachable on this task; {name} reaches "
                                          r"\d+\.\d\d%-\d+\.\d\d% over its knob range"):
        reachable(compressor, 0.0001, data)
    reachable(compressor.with_knob("retention", 0.25), 0.25, data)  # in range: nothing to say


# ---- calibration tied to its data -----------------------------------------------------------------
@pytest.mark.slow
def test_calibration_is_recomputed_when_its_documents_change(tmp_path, cache_dir, tiny_llava, smoke_questions, capsys):
    import shutil

    from harness.data.smoke import generate
    from harness.data.tasks import load_tasks, prepare_task_data
    from harness.run.calibrate import calibrate

    data = tmp_path / "data"
    shutil.copytree(smoke_questions.parent, data)
    cfg = make_cfg("+method=scissor", "retention=0.25", f"task.data_dir={data}", "task.calibration_size=4",
                   results_dir=tmp_path, cache_dir=cache_dir)
    job = job_of(cfg)
    prepare_task_data(job.task)
    tasks = load_tasks(job.task)
    kwargs = dict(frames=4, size=4, identity={"task": "smoke"}, cache_dir=tmp_path / "cache", data_dir=str(data))
    first = calibrate(job.method.compressor, 0.25, tiny_llava, tasks, **kwargs)
    assert calibrate(job.method.compressor, 0.25, tiny_llava, tasks, **kwargs) == first  # cached
    capsys.readouterr()
    # a calibration video replaced by another clip: the old result answers other data
    clip = json.loads((data / "questions.jsonl").read_text().splitlines()[0])["video"]
    other = generate(tmp_path / "other", clips=2, seed=5).parent / "videos" / "clip_001.mp4"
    shutil.copy(other, data / clip)
    again = calibrate(job.method.compressor, 0.25, tiny_llava, tasks, **kwargs)
    assert "the calibration documents changed" in capsys.readouterr().err
    assert again["documents"] != first["documents"]
    # a calibration file cut short is computed anew, not a crash
    path = next((tmp_path / "cache" / "calibration").glob("scissor-*.json"))
    path.write_text(path.read_text()[:20])
    assert calibrate(job.method.compressor, 0.25, tiny_llava, tasks, **kwargs)["knobs"] == again["knobs"]
    assert "unreadable" in capsys.readouterr().err


# ---- one writer per run directory, torn lines ----------------------------------------------------
def test_a_second_writer_of_a_run_directory_is_refused_naming_the_holder(tmp_path):
    first = RunDir(tmp_path / "run")
    first.lock()
    second = RunDir(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=rf"is being written by pid {os.getpid()} on "):
        second.lock()
    first.close()
    second.lock()  # released with its holder
    second.close()


def test_a_torn_last_line_is_dropped_and_its_sample_runs_again(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.lock()
    for i in range(3):
        run.append({"key": f"t/{i}/generate_until/0", "status": "ok", "result": "A"})
    run.close()
    path = tmp_path / "run" / "samples.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])  # a power cut in the middle of the last record
    assert drop_torn_tail(path) > 0 and len(read_samples(path)) == 2
    path.write_bytes(whole[:-10])
    again = RunDir(tmp_path / "run")
    again.lock()
    assert "dropped a torn last line" in capsys.readouterr().err
    assert set(again.completed()) == {"t/0/generate_until/0", "t/1/generate_until/0"}
    again.append({"key": "t/2/generate_until/0", "status": "ok", "result": "B"})
    again.close()
    assert [r["key"] for r in read_samples(path)] == [f"t/{i}/generate_until/0" for i in range(3)]


@pytest.mark.slow
def test_two_processes_on_one_configuration(tmp_path, cache_dir, tiny_model_dir, smoke_questions):
    """Started together, one writes and the other stops with one line naming it; the records are
    complete and unique."""
    overrides = ["+method=uniform", "retention=0.5", "task.limit=6", f"results_dir={tmp_path}", "progress=false"]
    env = {**os.environ, "VTC_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "harness", *smoke_defaults(overrides), *overrides]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob("*/.lock")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    if second.returncode == 0:  # the first had finished already: the second found it complete
        assert "(already complete)" in second.stdout
    else:
        assert second.returncode == 2
        assert "is being written by pid" in second.stderr and "Traceback" not in second.stderr
    records = read_samples(only_run_dir(tmp_path) / "samples.jsonl")
    assert len(records) == 6 and len({r["key"] for r in records}) == 6
    assert all(r["status"] == "ok" for r in records)


# ---- torn caches and model directories -----------------------------------------------------------
def test_a_truncated_feature_cache_entry_is_encoded_again(tmp_path, capsys):
    from harness.data.feature_cache import FeatureCache
    from harness.models.base import Encoded

    cache = FeatureCache(tmp_path, "f" * 40)
    visual = VisualInput(torch.randn(2, 4, 8), (2, 2))
    cache.save("k", Encoded(visual, {"newline": torch.zeros(1, 8)}, {}))
    assert torch.equal(cache.load("k", "cpu").visual.features, visual.features)
    entry = next(tmp_path.rglob("k.pt"))
    entry.write_bytes(entry.read_bytes()[:100])
    assert cache.load("k", "cpu") is None
    assert "unreadable" in capsys.readouterr().err and not entry.exists()


def test_a_model_directory_without_its_marker_is_built_again(tmp_path):
    import yaml

    from harness.models.random_weights import MARKER, random_model_dir
    from tests.helpers import CONF

    arch = yaml.safe_load((CONF / "model" / "qwen2_5_vl_small.yaml").read_text())["arch"]
    directory = random_model_dir(tmp_path, "small", arch, seed=0, family="qwen2_5_vl")
    (directory / MARKER).unlink()  # a directory cut short before its marker: never a model
    assert random_model_dir(tmp_path, "small", arch, seed=0, family="qwen2_5_vl") == directory
    assert (directory / MARKER).is_file()


@pytest.mark.slow
def test_kill_9_during_training_leaves_nothing_the_next_run_loads(tmp_path):
    recipe = ["model.train.vision.steps=400", "model.train.vision.batch=2",
              "model.train.language.stages=[{frames: 2, steps: 2, batch: 1}]"]
    env = {**os.environ, "VTC_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "harness.train_micro", *recipe]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(20)  # in the middle of the vision stage
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    models = tmp_path / "models"
    assert not [p for p in models.glob("micro-llava-onevision-*") if ".building-" not in p.name] if models.exists() else True
    quick = ["model.train.vision.steps=2", "model.train.vision.batch=2",
             "model.train.language.stages=[{frames: 2, steps: 2, batch: 1}]"]
    done = subprocess.run([sys.executable, "-m", "harness.train_micro", *quick], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    built = [p for p in models.iterdir() if ".building-" not in p.name]
    assert len(built) == 1 and (built[0] / "MICRO_MODEL.json").is_file()
    assert not list(models.glob("*.building-*"))  # the killed run's leftovers are gone


def test_an_unreadable_samples_line_in_the_middle_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"key": "a", "status": "ok"}\n{"key": "b", "sta\n{"key": "c", "status": "ok"}\n')
    assert [r["key"] for r in read_samples(path)] == ["a", "c"]
    assert drop_torn_tail(path) == 0  # the tail is whole


def test_generated_data_is_relocatable(tmp_path, monkeypatch):
    """Videos are named relative to the data directory; a copy elsewhere reads its own copies (the
    directory from $VTC_TASK_DATA, else the working directory, as lmms_eval's own CLI reads data_files)."""
    import shutil

    from harness.data.generated import DATA_ENV, video_path
    from harness.data.smoke import generate

    questions = generate(tmp_path / "a", clips=2)
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    assert all(not os.path.isabs(r["video"]) for r in rows)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "b"))
    assert all(os.path.isfile(video_path(r["video"])) for r in rows)
    monkeypatch.delenv(DATA_ENV)
    monkeypatch.chdir(tmp_path / "b")
    assert all(video_path(r["video"]) == str(tmp_path / "b" / r["video"]) for r in rows)
    assert video_path("/abs/x.mp4") == "/abs/x.mp4"
