"""Stacked methods (methods/pipeline.py) and the declared stage interface (methods/core/base.py)."""

from dataclasses import dataclass

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.errors import ConfigError
from harness.models.llava_onevision import LlavaOneVision
from methods.core import decoder
from methods.core.base import Compressor
from methods.core.flops import LLMShape, retention_numbers
from methods.fastv import FastV
from methods.pipeline import Pipeline
from methods.uniform import Uniform
from tests.helpers.tolerance import bound

QUESTION = "What colour is the moving square?\nA. red\nB. blue"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_002.mp4", 4),
                      p.size, p.mean, p.std)


def test_a_visual_and_a_prefill_method_stacked_equal_running_them_in_sequence(adapter, pixels):
    stack = methods.build("pipeline", stages=["uniform", "fastv"], uniform={"retention": 0.5},
                          fastv={"K": 3, "keep": 0.25})
    assert stack.stages == {"visual", "prefill"} and stack.title == "uniform+fastv"
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, stack, ids)
    out = adapter.prefill(prompt, stack, use_cache=False)
    # by hand: uniform pooling of the features, the prompt around them, then FastV in the LLM
    encoded = adapter.encode(pixels)
    visual, newline = encoded.visual, encoded.extras["newline"]
    tokens = Uniform(retention=0.5).compress(visual)
    embeds, positions, span = adapter.embed(ids, tokens, newline, 4 * 196)
    policy = FastV(K=3, keep=0.25).prefill_policy(adapter.llm.shape)
    by_hand = decoder.prefill(adapter.llm, embeds, positions, span, policy, use_cache=False)
    # the same kernels on the same inputs in the same order: exact
    torch.testing.assert_close(out.logits, by_hand.logits, rtol=0, atol=0)
    video = tokens.shape[0]
    assert video == 4 * 98 and prompt.run.video_tokens_in == 4 * 196
    assert out.layer_video_tokens == [video] * 3 + [round(0.25 * video)] * 5
    assert prompt.run.video_tokens_out == round(0.25 * video)


@pytest.mark.parametrize("stages, message", [
    (["uniform", "scissor"], "uniform and scissor both act in the visual stage"),
    (["fastv", "uniform"], "the visual-stage method \\(uniform\\) must come first"),
    (["none", "fastv"], "none cannot be a stage of a pipeline"),
    (["fastv"], "expected at least two methods"),
    ("fastv", "expected a list of method names"),
])
def test_bad_stacks_are_rejected(stages, message):
    with pytest.raises(ValueError, match=message):
        methods.build("pipeline", stages=stages)


def test_knobs_for_a_method_outside_the_stack_are_rejected():
    with pytest.raises(ValueError, match="knobs given for topk, which is not among its stages"):
        methods.build("pipeline", stages=["uniform", "fastv"], topk={"retention": 0.5})
    with pytest.raises(ValueError, match="has no knob kep"):
        methods.build("pipeline", stages=["uniform", "fastv"], fastv={"kep": 0.5})


def test_retention_tunes_the_last_tunable_part_measured_on_the_whole_stack():
    stack = methods.build("pipeline", stages=["uniform", "fastv"], uniform={"retention": 0.5})
    assert stack.retention_knob.knob == "fastv.keep" and stack.retention_knob.measure == "rho_flops"
    assert not stack.retention_knob.direct  # the stack's retention is measured, never assumed
    changed = stack.with_knob("fastv.keep", 0.125)
    assert changed.parts[1].keep == 0.125 and changed.parts[0].retention == 0.5
    assert stack.parts[1].keep == 0.5  # with_knob copies


@pytest.mark.slow
def test_stack_calibration_reaches_the_flops_target(cfg_factory, adapter):
    from harness.data.tasks import load_tasks, prepare_task_data
    from harness.run.calibrate import TOLERANCE, calibrate, calibration_set
    from tests.helpers import choice_of, job_of

    cfg = cfg_factory("+method=pipeline", "method.stages=[uniform,fastv]", "+method.uniform.retention=0.5",
                      "retention=0.15", "task.limit=4")
    choice = choice_of(cfg)
    assert choice.title == "uniform+fastv" and choice.label == "r=0.5; r=0.15"
    assert choice.knobs["uniform"]["retention"] == 0.5 and choice.target_retention == 0.15
    prepare_task_data(job_of(cfg).task)
    tasks = load_tasks(job_of(cfg).task)
    result = calibrate(choice.compressor, 0.15, adapter, tasks, frames=cfg.model.frames, size=4, identity={})
    keep = result["knobs"]["fastv.keep"]
    achieved = result["achieved_on_calibration"]
    assert achieved == pytest.approx(0.15, abs=TOLERANCE / 4)
    # the achieved value is the stack's: uniform's tokens, then FastV's, against the full video
    video = cfg.model.frames * 98  # uniform at 50 %: a 7x14 grid per frame
    kept = max(1, round(keep * video))
    texts = calibration_set(adapter, tasks, 4, cfg.model.frames, False, False).text_tokens
    per_doc = [retention_numbers(cfg.model.frames * 196, t, [video] * 2 + [kept] * 6,
                                 LLMShape(64, 128, 8))["rho_flops"] for t in texts]
    # float64 means of the same per-prompt values, perhaps summed in another order
    assert achieved == pytest.approx(sum(per_doc) / len(per_doc), abs=bound(torch.float64, len(per_doc)))
    # a target below what the held parts allow names them, since they bound the stack
    with pytest.raises(ConfigError, match=r"retention=0.9: unreachable on this task; uniform\+fastv "
                                          r"\(rho_flops over fastv.keep, with uniform retention=0.5 held\)"):
        calibrate(choice.compressor, 0.9, adapter, tasks, frames=cfg.model.frames, size=4, identity={})


def test_declared_stages_must_match_the_hooks():
    with pytest.raises(TypeError, match="declares stages \\['prefill'\\] but lacks prefill_policy"):
        @dataclass
        class Broken(Compressor):
            name = "broken"
            stages = frozenset({"prefill"})

    with pytest.raises(TypeError, match="declares stages \\[\\] but defines compress"):
        @dataclass
        class Undeclared(Compressor):
            name = "undeclared"

            def compress(self, x):
                return x.features.flatten(0, 1)

    with pytest.raises(TypeError, match="unknown stage"):
        @dataclass
        class Typo(Compressor):
            name = "typo"
            stages = frozenset({"visaul"})


def test_every_registered_method_declares_consistent_capabilities():
    for name in methods.known():
        cls = methods.REGISTRY[name]
        if cls.composite:
            continue
        assert cls.stages, f"{name} declares no stage"
        knob = cls.retention_knob
        if knob is not None:
            assert knob.knob in {f for f in cls.__dataclass_fields__}, f"{name}: {knob.knob} is no knob"
            assert knob.measure in ("rho_tok", "rho_flops")
        assert cls.reference == (name == "none")
    assert methods.REGISTRY["pipeline"] is Pipeline
