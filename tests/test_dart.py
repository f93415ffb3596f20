"""DART (methods/dart.py) against its literal reference and the stock model; FLOPs matching.

The references never call methods/dart.py: tests/reference/dart.py selects with Python sets and
float64 on what the *stock* model computes (its cached keys at layer K-1 and its hidden states
through its final norm), and gets logits from the stock model with the dropped tokens masked
from layers >= K at their original positions.
"""

from pathlib import Path

import pytest
import torch

import methods
from harness.run.calibrate import CalibrationSet, bisect_knob, mean_measure
from methods.core import decoder
from methods.core.flops import LLMShape, retention_numbers
from methods.dart import DART, dart_counts, dart_select, picks_per_pivot
from tests.helpers.tolerance import close
from tests.reference.dart import masked_logits, reference_select, stock_inputs

FRAMES, LAYERS = 4, 8
GOLDEN = Path(__file__).parent / "golden" / "dart_golden.pt"
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


@pytest.fixture(scope="module")
def llava(tiny_llava, smoke_questions):
    return tiny_llava, tiny_llava.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)


# ---- knobs and counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"keep": 0.0}, r"dart.keep=0.0: expected a value in \(0.0, 1.0\]"), ({"keep": 1.5}, "dart.keep=1.5"),
    ({"layer": 0}, "dart.layer=0"), ({"pivot_image": 0}, "dart.pivot_image=0"),
    ({"pivot_text": -1}, "dart.pivot_text=-1"), ({"pivot_image": 2.5}, "dart.pivot_image=2.5"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("dart", **knobs)


def test_layer_at_or_beyond_the_depth_is_an_error():
    with pytest.raises(ValueError, match=r"dart.layer=8: expected a layer in \[1, 7\]"):
        DART(layer=8).prefill_policy(LLMShape(64, 128, LAYERS))


def test_counts_are_the_official_ones():
    assert picks_per_pivot(128 / 576, 576, 4, 4) == 16 and dart_counts(128 / 576, 576, 4, 4) == 132  # 4 + 8*16
    assert dart_counts(0.222, 32 * 196, 4, 4) == 4 + 8 * int(0.222 * 32 * 196 / 8)  # Qwen budget, truncated
    assert dart_counts(0.01, 100, 4, 4) == 4  # no picks: the image pivots
    for frames in range(1, 9):  # keep = 1 keeps every token of F*196 (and of F*256)
        assert dart_counts(1.0, frames * 196, 4, 4) == frames * 196
        assert dart_counts(1.0, frames * 256, 4, 4) == frames * 256
    assert dart_counts(0.5, 3, 4, 4) == 3  # fewer tokens than pivots
    policy = DART(keep=0.25).prefill_policy(LLMShape(64, 128, LAYERS))
    assert policy.planned(784) == [784] * 2 + [dart_counts(0.25, 784, 4, 4)] * 6


# ---- selection against the reference -------------------------------------------------------------
@pytest.mark.parametrize("seed, video, text, keep, pivots", [
    (0, 200, 12, 0.2, (4, 4)), (1, 64, 9, 0.5, (4, 4)), (2, 100, 3, 0.3, (2, 5)), (3, 50, 20, 0.9, (4, 4)),
    (4, 40, 6, 0.05, (3, 1)), (5, 30, 8, 0.3, (1, 0)),
])
def test_selection_equals_the_literal_reference(seed, video, text, keep, pivots):
    g = torch.Generator().manual_seed(seed)
    head, n = 7, 7 + video + text
    keys, normed = torch.randn(n, 32, generator=g), torch.randn(n, 16, generator=g)
    ref = reference_select(keys, normed, range(head, head + video), list(range(head + video, n)),
                           *pivots, keep)
    assert ref.margin > 1e-6
    kept = dart_select(keys, normed, torch.arange(head, head + video), torch.arange(head + video, n), *pivots,
                       picks_per_pivot(keep, video, *pivots))
    assert (kept + head).tolist() == ref.kept
    image, text_pivots = pivots[0], min(pivots[1], text)  # fewer text tokens than p_t: all are pivots
    assert len(kept) == image + min(video - image, (image + text_pivots) * picks_per_pivot(keep, video, *pivots))


def test_golden():
    case = torch.load(GOLDEN)
    head, video, keep, pivots = case["head"], case["video"], case["keep"], case["pivots"]
    keys, normed = case["keys"].float(), case["normed"].float()
    kept = dart_select(keys, normed, torch.arange(head, head + video), torch.arange(head + video, len(keys)),
                       *pivots, picks_per_pivot(keep, video, *pivots))
    assert torch.equal(kept + head, case["kept"])


# ---- the LLM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, keep", [(2, 0.222), (3, 0.5)])
def test_prefill_and_cached_decoding_equal_the_stock_model(llava, layer, keep):
    adapter, pixels = llava
    compressor = DART(layer=layer, keep=keep)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    (start, end), total = prompt.span, prompt.embeds.shape[1]
    out = adapter.prefill(prompt, compressor, use_cache=True)
    lm = adapter.model.model.language_model  # the stock forward (SDPA, explicit masks)
    keys, normed = stock_inputs(lm, prompt.embeds, layer)
    ref = reference_select(keys, normed, range(start, end), list(range(end, total)), 4, 4, keep)
    assert ref.margin > 1e-6
    video = [i for i in out.kept.tolist() if start <= i < end]
    assert video == ref.kept and len(video) == dart_counts(keep, end - start, 4, 4)
    dropped = sorted(set(range(start, end)) - set(ref.kept))
    tol = close(torch.float32, total + 64, depth=LAYERS)
    torch.testing.assert_close(out.logits[0], masked_logits(lm, adapter.model.lm_head, prompt.embeds, dropped, layer)[
        out.kept], **tol)
    assert prompt.run.layer_video_tokens == [end - start] * layer + [len(video)] * (LAYERS - layer)
    state, token, embeds = out.state, out.logits[0, -1].argmax().view(1, 1), prompt.embeds
    for _ in range(2):  # the kept set is the prefill's; generated tokens see it from layer K on
        logits = decoder.decode(adapter.llm, state, token)
        embeds = torch.cat([embeds, adapter.model.get_input_embeddings()(token)], 1)
        expected = masked_logits(lm, adapter.model.lm_head, embeds, dropped, layer)[-1]
        torch.testing.assert_close(logits[0, -1], expected, **tol)
        token = logits[0, -1].argmax().view(1, 1)
    cached = [total + 2] * layer + [len(out.kept) + 2] * (LAYERS - layer)
    assert [c.keys.shape[-2] for c in state.cache.layers] == cached


def test_the_text_pivots_come_from_the_question(llava):
    """DART reads the question (its text pivots), so it shares no prefix. On the random tiny model the
    lowest-cosine picks of different pivots mostly coincide (its video states are nearly alike), so
    two questions keep the same set at the default keep; at keep 0.5 they differ."""
    adapter, pixels = llava
    compressor = DART(keep=0.5)
    assert not compressor.shares_prefix
    kept = []
    for question in (QUESTION, "Which way does the square move?\nA. left\nB. right\nAnswer with the letter."):
        prompt = adapter.prepare(pixels, compressor, adapter.prompt_ids(question)[0])
        start, end = prompt.span
        kept.append([i for i in adapter.prefill(prompt, compressor, use_cache=False).kept.tolist() if start <= i < end])
    assert len(kept[0]) == len(kept[1]) and kept[0] != kept[1]


def test_keep_one_is_none(llava):
    adapter, pixels = llava
    none, everything = methods.build("none"), DART(keep=1.0)
    ids, _ = adapter.prompt_ids(QUESTION)
    a = adapter.prefill(adapter.prepare(pixels, none, ids), none, use_cache=False)
    prompt = adapter.prepare(pixels, everything, ids)
    assert torch.equal(a.logits, adapter.prefill(prompt, everything, use_cache=False).logits)
    assert prompt.run.layer_video_tokens == [FRAMES * 196] * LAYERS


def test_qwen_selection_equals_the_reference_at_original_ids(qwen, smoke_questions):
    pixels = qwen.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)
    compressor = DART(keep=0.3)
    ids, _ = qwen.prompt_ids(QUESTION)
    prompt = qwen.prepare(pixels, compressor, ids)
    (start, end), total = prompt.span, prompt.embeds.shape[1]
    out = qwen.prefill(prompt, compressor, use_cache=True)
    lm = qwen.model.model.language_model
    with torch.no_grad():
        stock = lm(inputs_embeds=prompt.embeds, position_ids=prompt.positions, use_cache=True,
                   output_hidden_states=True)
        normed = lm.norm(stock.hidden_states[2])[0]
    keys = stock.past_key_values.layers[1].keys[0]
    ref = reference_select(keys.transpose(0, 1).reshape(total, -1), normed,
                           range(start, end), list(range(end, total)), 4, 4, 0.3)
    assert ref.margin > 1e-6
    assert [i for i in out.kept.tolist() if start <= i < end] == ref.kept
    assert out.state.next_position.flatten().tolist() == [prompt.positions.amax().item() + 1] * 3


# ---- retention by FLOPs matching ---------------------------------------------------------------------
@pytest.mark.parametrize("target, text, video, shape", [
    (0.5, 100, 32 * 196, LLMShape(3584, 18944, 28)),  # LLaVA-OneVision-7B, 32 frames
    (0.25, 100, 32 * 196, LLMShape(3584, 18944, 28)),
    (0.4, 87, 16 * 196, LLMShape(896, 4864, 24)),  # 0.5B
    (0.6, 60, 8 * 196, LLMShape(64, 128, LAYERS)),  # the tiny smoke model
])
def test_flops_matching_reaches_the_target_within_one_step(target, text, video, shape):
    data, spec = CalibrationSet([text], [video]), DART.retention_knob
    keep, achieved, _ = bisect_knob(lambda v: mean_measure(DART().with_knob("keep", v), spec.measure, data, shape),
                                    *DART().knob_range(spec.knob), target, precision=1e-5, what="dart")
    kept = dart_counts(keep, video, 4, 4)
    numbers = retention_numbers(video, text, [video] * 2 + [kept] * (shape.layers - 2), shape)
    assert numbers["rho_flops"] == pytest.approx(achieved, abs=1e-12)
    # the kept count moves in steps of p_i + p_t = 8 tokens: within one step of the target
    step = retention_numbers(video, text, [video] * 2 + [kept + 8] * (shape.layers - 2), shape)["rho_flops"] - achieved
    assert abs(achieved - target) <= step


@pytest.mark.slow
def test_a_harness_run_with_a_retention_target(cfg_factory):
    import json

    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=dart", "retention=0.6", "task.limit=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["retention"]["rho_flops"]["mean"] == pytest.approx(0.6, abs=0.01)
