"""SparseVLM (methods/sparsevlm.py) against its literal reference and the stock model; FLOPs matching.

The references never call methods/sparsevlm.py (the stage counts k_s are their input):
tests/reference/sparsevlm.py restates the counts with exact fractions, the raters, one stage with
its DPC-kNN in float64 loops, and the whole prefill on the *stock* eager model, one slice of layers
at a time, the raters' attention read from its attention weights.
"""

from pathlib import Path

import pytest
import torch

import methods
from harness.run.calibrate import CalibrationSet, bisect_knob, mean_measure
from methods.core import decoder
from methods.core.flops import LLMShape, retention_numbers
from methods.sparsevlm import (
    PRESETS,
    SparseVLM,
    layer_counts,
    raters,
    schedule_for,
    stage,
    stage_counts,
)
from tests.helpers.tolerance import close
from tests.reference.sparsevlm import reference_counts, reference_prefill, reference_raters, reference_stage

FRAMES, LAYERS = 2, 8
QUESTION = "What colour is the moving square?\nA. red\nB. blue"
TINY = LLMShape(64, 128, LAYERS)
GOLDEN = Path(__file__).parent / "golden" / "sparsevlm_golden.pt"


@pytest.fixture(scope="module")
def eager(tiny_model_dir, smoke_questions):
    """The tiny LLaVA with eager attention (the reference reads attention weights) and noise frames
    (the smoke clips' still background gives many identical states, whose density-peak ties only
    the 1e-6 noise breaks: below what float32 and float64 resolve alike)."""
    from harness.models.llava_onevision import LlavaOneVision

    adapter = LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")
    clip = adapter.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)
    return adapter, torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))


# ---- knobs, layers, counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"keep": 0.0}, r"sparsevlm.keep=0.0: expected a value in \(0.0, 1.0\]"),
    ({"recycle": 1.5}, "sparsevlm.recycle=1.5"), ({"cluster_div": 1}, "sparsevlm.cluster_div=1"),
    ({"layers": [2, 6]}, r"sparsevlm.layers=\[2, 6\]: expected three"),
    ({"layers": [6, 2, 15]}, "expected three increasing"), ({"layers": [-1, 2, 3]}, "sparsevlm.layers=\\[-1, 2, 3\\]"),
    ({"positions": "first"}, "sparsevlm.positions='first'"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("sparsevlm", **knobs)


@pytest.mark.parametrize("depth, expected", [(32, (2, 6, 15)), (28, (2, 6, 15)), (17, (2, 6, 15)),
                                             (16, (1, 3, 8)), (8, (1, 2, 4))])
def test_layers_are_official_where_they_fit_and_scaled_below(depth, expected):
    assert SparseVLM().resolved_layers(depth) == expected
    policy = SparseVLM().prefill_policy(LLMShape(64, 128, depth))
    assert policy.layers == (0,) + tuple(l + 1 for l in expected)  # raters first, then after each layer


def test_layers_that_do_not_fit_are_an_error():
    with pytest.raises(ValueError, match=r"too shallow.*give three layers"):
        SparseVLM().resolved_layers(3)
    with pytest.raises(ValueError, match=r"sparsevlm.layers=\[2, 6, 15\]: the last stage acts after layer 15; "
                                         r"expected a layer in \[0, 6\] for an LLM of 8 layers"):
        SparseVLM(layers=[2, 6, 15]).prefill_policy(TINY)


def test_counts_are_the_official_arithmetic():
    assert stage_counts(576, PRESETS[192]) == [(300, 9), (200, 4), (110, 3)]  # 576 -> 309 -> 204 -> 113
    for video in (1, 2, 7, 64, 196, 576, 784, 6272):
        for preset in PRESETS.values():
            assert stage_counts(video, preset) == reference_counts(video, preset)
            assert stage_counts(video, preset, 0.5, 3) == reference_counts(video, preset, 0.5, 3)
    assert layer_counts(576, PRESETS[192], (2, 6, 15), 32) == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16


def test_the_schedule_takes_the_nearest_presets_shape_and_is_monotone():
    shape = LLMShape(3584, 18944, 28)
    for keep, preset in [(0.34, 192), (0.3, 192), (0.21, 128), (0.17, 96), (0.12, 64)]:
        k = schedule_for(keep, 6272, shape, (2, 6, 15))
        ratios = [a / b for a, b in zip(k, PRESETS[preset])]
        assert max(ratios) / min(ratios) < 1 + 1 / min(k), (keep, k)  # one factor, then rounding
    flops = [retention_numbers(6272, 100, SparseVLM(keep=step / 100).prefill_policy(shape).planned(6272),
                               shape)["rho_flops"] for step in range(1, 101)]
    assert all(0 <= b - a <= 0.02 for a, b in zip(flops, flops[1:]))  # monotone, no jump at a preset change


# ---- the steps against the reference ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_raters_equal_the_literal_reference(seed):
    g = torch.Generator().manual_seed(seed)
    video, text = torch.randn(30, 8, generator=g), torch.randn(11, 8, generator=g)
    assert raters(video, text).tolist() == reference_raters(video, text)
    assert raters(video, text[:1]).tolist() == [0] == reference_raters(video, text[:1])  # none above the mean


@pytest.mark.parametrize("seed, count, k", [(0, 200, 60), (1, 120, 119), (0, 50, 5), (5, 90, 20), (0, 1, 5)])
def test_a_stage_equals_the_literal_reference(seed, count, k):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(count, generator=g)
    states = torch.randn(4, 16, generator=g)[torch.randint(0, 4, (count,), generator=g)] + 0.5 * torch.randn(
        count, 16, generator=g)
    kept, _ = stage_counts(count, [k])[0]
    dropped = count - kept
    recycled = int(dropped * 0.3) + 1
    noise = torch.rand((1, recycled), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)[0] * 1e-6
    ref = reference_stage(scores.tolist(), states, k, noise)
    assert ref.margin > 1e-6 and ref.density_gap > 2e-7  # float32 decides as float64 does
    video, hidden, order = stage(scores, states, k, generator=torch.Generator().manual_seed(seed))
    assert video[order].tolist() == ref.entries  # kept in order, then the centres in centre-score order
    assert len(video) == sum(stage_counts(count, [k])[0]) and ref.kept == kept
    torch.testing.assert_close(hidden[order].double(), ref.states, **close(torch.float32, count))


def test_golden():
    case = torch.load(GOLDEN)
    video, hidden, order = stage(case["scores"], case["states"].float(), case["k"],
                                 generator=torch.Generator().manual_seed(case["seed"]))
    assert torch.equal(video[order], case["entries"])
    torch.testing.assert_close(hidden[order], case["tokens"], **close(torch.float32, len(case["scores"])))


# ---- the LLM ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_prefill_and_cached_decoding_equal_the_stock_model(eager, positions):
    adapter, pixels = eager
    compressor = SparseVLM(keep=0.45, positions=positions)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    span, total = prompt.span, prompt.embeds.shape[1]
    video = span[1] - span[0]
    out = adapter.prefill(prompt, compressor, use_cache=True)
    layers, schedule = (1, 2, 4), schedule_for(0.45, video, TINY, (1, 2, 4))
    lm, head = adapter.model.model.language_model, adapter.model.lm_head
    ref = reference_prefill(lm, head, prompt.embeds, span, total, layers, schedule, seed=0, positions=positions)
    assert ref.margin > 1e-8  # no ranking within float32 round-off of the stock attention weights
    assert out.kept.tolist() == ref.origin  # clusters after the kept tokens, at their centres' entries
    assert prompt.run.layer_video_tokens == ref.counts == layer_counts(video, schedule, layers, LAYERS)
    tol = close(torch.float32, total + 64, depth=LAYERS)
    torch.testing.assert_close(out.logits, ref.logits, **tol)
    assert out.state.decode_compact == (positions == "compact")
    state, token, embeds = out.state, out.logits[0, -1].argmax().view(1, 1), prompt.embeds
    for _ in range(2):  # compact: each layer at its own cache length; original: after the prompt's ids
        logits = decoder.decode(adapter.llm, state, token)
        embeds = torch.cat([embeds, adapter.model.get_input_embeddings()(token)], 1)
        ref = reference_prefill(lm, head, embeds, span, total, layers, schedule, seed=0, positions=positions)
        torch.testing.assert_close(logits, ref.logits[:, -1:], **tol)
        token = logits[0, -1].argmax().view(1, 1)


def test_qwen_keeps_original_ids_and_refuses_compact(qwen, smoke_questions):
    pixels = qwen.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), 4)
    compressor = SparseVLM(keep=0.5)
    ids, _ = qwen.prompt_ids(QUESTION)
    prompt = qwen.prepare(pixels, compressor, ids)
    video = prompt.span[1] - prompt.span[0]
    out = qwen.prefill(prompt, compressor, use_cache=True)
    assert prompt.run.layer_video_tokens == compressor.prefill_policy(qwen.llm_shape).planned(video)
    assert out.state.position_shift is None and not out.state.decode_compact
    assert out.state.next_position.flatten().tolist() == [prompt.positions.amax().item() + 1] * 3
    with pytest.raises(ValueError, match="sparsevlm.positions=compact needs 1-D position ids"):
        qwen.prefill(prompt, SparseVLM(positions="compact"), use_cache=False)


# ---- retention by FLOPs matching ----------------------------------------------------------------------
@pytest.mark.parametrize("target, text, video, shape", [
    (0.5, 100, 32 * 196, LLMShape(3584, 18944, 28)),  # LLaVA-OneVision-7B, 32 frames
    (0.25, 100, 32 * 196, LLMShape(3584, 18944, 28)),
    (0.2, 87, 16 * 196, LLMShape(896, 4864, 24)),  # 0.5B
    (0.6, 60, 8 * 196, TINY),  # the tiny smoke model
])
def test_flops_matching_reaches_the_target(target, text, video, shape):
    data, spec = CalibrationSet([text], [video]), SparseVLM.retention_knob
    keep, achieved, _ = bisect_knob(
        lambda v: mean_measure(SparseVLM().with_knob("keep", v), spec.measure, data, shape),
        *SparseVLM().knob_range(spec.knob), target, precision=1e-5, what="sparsevlm")
    policy = SparseVLM(keep=keep).prefill_policy(shape)
    flops = retention_numbers(video, text, policy.planned(video), shape)["rho_flops"]
    assert flops == pytest.approx(achieved, abs=1e-12)
    assert achieved == pytest.approx(target, abs=2e-3)  # steps of one token in the first stage


@pytest.mark.slow
def test_a_harness_run_with_a_retention_target(cfg_factory):
    import json

    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=sparsevlm", "retention=0.6", "task.limit=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["retention"]["rho_flops"]["mean"] == pytest.approx(0.6, abs=0.01)
