"""Bad input never reaches a traceback; changed data is never resumed; the terminal stays quiet."""

import json
import os
import re

import pytest

from harness.errors import ConfigError
from harness.run.rundir import read_samples
from tests.helpers import harness, only_run_dir, run_config


@pytest.mark.parametrize("override, message", [
    ("model.frames=0", "model.frames=0: expected an integer >= 1"),
    ("model.frames=-3", "model.frames=-3: expected an integer >= 1"),
    ("model.max_new_tokens=0", "model.max_new_tokens=0: expected an integer >= 1"),
    ("model.dtype=fp8", "model.dtype='fp8': expected one of float32, bfloat16, float16"),
    ("model.device=gpu", "model.device='gpu': expected auto, cpu, mps, cuda or cuda:N"),
    ("model.attn_implementation=flash", "model.attn_implementation='flash': expected one of"),
    ("task.limit=0", "task.limit=0: expected an integer >= 1 or null"),
    ("task.calibration_size=0", "task.calibration_size=0: expected an integer >= 1"),
    ("seed=-1", "seed=-1: expected an integer >= 0"),
    # the top-level shortcuts are the method's knobs, checked under its name
    ("retention=1.5", "none.retention=1.5: expected a value in (0, 1]"),
    ("+method=scissor retention=0", "scissor.retention=0: expected a value in (0, 1]"),
    ("+method=scissor tau=2", "scissor.tau=2.0: expected a value in [-1.0, 1.0]"),
    ("+method=uniform retention=1.5", "uniform.retention=1.5: expected a value in (0, 1]"),
    ("tau=0.9", "tau=0.9: method none has no knob tau"),
    ("model.family=llava", "model.family='llava': expected one of llava_onevision, qwen2_5_vl"),
    ("model=qwen2_5_vl_small model.build_tiny=true",
     "model.build_tiny=true builds the embedded LLaVA-OneVision smoke model: expected model.family=llava_onevision"),
])
def test_every_ranged_field_is_checked_before_anything_loads(cfg_factory, override, message, monkeypatch):
    import harness.run.evaluate as run_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the task or model was loaded before the config was checked")

    monkeypatch.setattr(run_module, "load_tasks", no_loading)
    monkeypatch.setattr(run_module, "prepare_task_data", no_loading)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config(cfg_factory(*override.split()))


@pytest.mark.parametrize("override, message", [
    ("method.K=99", "fastv.K=99: expected a layer in [1, 7] for an LLM of 8 layers"),
    ("method.K=0", "fastv.K=0: expected an integer in [1, inf]"),
    ("method.keep=2", "fastv.keep=2: expected a value in (0.0, 1.0]"),
])
@pytest.mark.slow
def test_method_knobs_are_checked_before_the_model_loads(cfg_factory, override, message, monkeypatch):
    import harness.models.llava_onevision as llava

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before its knobs were checked")

    monkeypatch.setattr(llava.LlavaOneVision, "__init__", no_model)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config(cfg_factory("+method=fastv", override))


def test_a_method_needing_inputs_the_family_lacks_is_refused_before_loading(cfg_factory, tmp_path, monkeypatch):
    """FastVID's SigLIP head reads SigLIP's encoder states (encoder_hidden): not defined for Qwen2.5-VL."""
    import harness.run.evaluate as run_module
    from tests.helpers import random_siglip

    def no_loading(*args, **kwargs):
        raise AssertionError("the task or model was loaded before the method was checked against the family")

    monkeypatch.setattr(run_module, "load_tasks", no_loading)
    monkeypatch.setattr(run_module, "model_directory", no_loading)
    path = tmp_path / "siglip32"
    random_siglip(hidden=32, heads=2, seed=3).save_pretrained(path)
    message = ("method fastvid needs encoder_hidden from the vision encoder, which model.family=qwen2_5_vl "
               "does not provide: the method is not defined for this family")
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config(cfg_factory("model=qwen2_5_vl_small", "+method=fastvid", f"method.siglip_path={path}"))


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["model.frames=0"], "error: model.frames=0: expected an integer >= 1"),
    (["model.frames=-3"], "error: model.frames=-3: expected an integer >= 1"),
    (["+method=fastv", "method.K=99"], "error: fastv.K=99: expected a layer in [1, 7]"),
])
@pytest.mark.slow
def test_config_errors_are_one_line_and_a_failing_exit(args, message, tmp_path, cache_dir):
    proc = harness(*args, results=tmp_path / "results", cache=cache_dir, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""


def test_invalid_model_config_json_names_the_file(tmp_path, cfg_factory):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"text_config": {"hidden_size": 8,}')
    with pytest.raises(ConfigError, match=f"{model}/config.json is not valid JSON \\(line 1, column 35"):
        run_config(cfg_factory("model=llava_ov_0.5b", f"model.path={model}", "task.limit=1"))


@pytest.mark.slow
def test_an_unexpected_exception_is_one_line_naming_the_log(tmp_path, cache_dir, tiny_model_dir):
    """A model directory whose weights are garbage: the loader's exception is not ours to word,
    but it still ends in one line, with the log holding the traceback and a failing exit."""
    model = tmp_path / "broken"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
                 "preprocessor_config.json"):
        if (tiny_model_dir / name).is_file():
            (model / name).write_text((tiny_model_dir / name).read_text())
    (model / "model.safetensors").write_bytes(b"not safetensors" * 10)
    results = tmp_path / "results"
    proc = harness("model=llava_ov_0.5b", f"model.path={model}", "model.dtype=float32", "task.limit=1",
                   results=results, cache=cache_dir, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "full traceback in " in last, proc.stderr[-2000:]
    log = re.search(r"full traceback in (\S+\.log)", last).group(1)
    assert "Traceback" in open(log).read() and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_failing_point_of_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path, cache_dir, tiny_model_dir):
    results = tmp_path / "results"
    proc = harness("-m", "+method=uniform", "retention=0.5", "model.frames=0,2", "task.limit=2",
                   results=results, cache=cache_dir, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = next((results / "sweeps").iterdir())
    assert "model.frames=0: expected an integer >= 1" in (sweep / "errors.txt").read_text()
    assert "uniform (r=0.5)" in (sweep / "table.md").read_text()  # the other point ran


@pytest.mark.slow
def test_changed_videos_are_not_resumed(cfg_factory, tmp_path, smoke_questions, capsys):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    rows = [json.loads(line) for line in smoke_questions.read_text().splitlines()[:3]]
    for i, row in enumerate(rows):
        target = data / "videos" / f"v{i}.mp4"
        target.write_bytes((smoke_questions.parent / row["video"]).read_bytes())
        row["video"] = str(target)
    (data / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_factory(f"task.data_dir={data}", "+method=uniform", "retention=0.5")
    run_dir = run_config(cfg)
    first = read_samples(run_dir / "samples.jsonl")
    assert len(first) == 3
    capsys.readouterr()
    run_config(cfg)  # unchanged data: complete, nothing recomputed
    assert "(already complete)" in capsys.readouterr().out
    # the second video is replaced by another clip: a finished run is not taken as done, and its
    # samples are discarded with a note
    other = smoke_questions.parent / json.loads(smoke_questions.read_text().splitlines()[5])["video"]
    (data / "videos" / "v1.mp4").write_bytes(other.read_bytes())
    st = os.stat(data / "videos" / "v1.mp4")
    os.utime(data / "videos" / "v1.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    run_config(cfg)
    err = capsys.readouterr().err
    assert "3 samples of" in err and "were discarded: 1 of its data files changed since" in err
    assert "v1.mp4" in err
    config = json.loads((run_dir / "config.json").read_text())
    # data files under the task's data directory are recorded relative to it (a moved checkout keeps its runs)
    assert config["data_files"]["<data>/videos/v1.mp4"][0] == os.path.getsize(data / "videos" / "v1.mp4")
    assert len(read_samples(run_dir / "samples.jsonl")) == 3


@pytest.mark.slow
def test_the_default_command_prints_only_its_own_lines(tmp_path, cache_dir, tiny_model_dir, smoke_questions):
    results = tmp_path / "results"
    proc = harness("task.limit=3", results=results, cache=cache_dir)
    out, err = proc.stdout.strip().splitlines(), proc.stderr.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[SMOKE: random model] smoke | tiny | none |")
    steps = [line for line in err if re.fullmatch(r".+ \.\.\. \d+\.\d\d s", line)]
    assert [s.split(" ...")[0] for s in steps] == [
        "preparing the data of task smoke", "building model tiny", "loading lmms_eval task vtc_smoke_mc",
        "loading model tiny (float32, auto)"]
    assert err == steps, err  # nothing else: no library logs, warnings or their progress bars
    run_dir = only_run_dir(results)
    assert json.loads((run_dir / "summary.json").read_text())["n_samples"] == 3
