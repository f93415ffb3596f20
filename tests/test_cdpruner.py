"""methods/cdpruner.py against CDPruner's official `encode_images` as its docstring states it and its
literal restatement.

The literal reference (tests/reference/cdpruner.py) computes the relevance and runs the greedy fast-MAP
DPP over Python lists in float64; float64 input makes the implementation decide in float64 too. float32
comparisons use inputs whose picks are at least SAFE from a tie and whose gains are far from the
candidate threshold. Structured inputs (one-hot tokens) have exact cosines.
"""

from __future__ import annotations

import json

import pytest
import torch

import methods
from methods.cdpruner import CDPruner, cdpruner_compress, cdpruner_relevance, cdpruner_select
from methods.core.base import VideoTokens, VisualInput
from tests.reference.cdpruner import reference_cdpruner, reference_dpp, reference_relevance

SAFE = 1e-5
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def inputs(frames: int, per_frame: int, dim: int, seed: int, dtype=torch.float32, words: int = 6):
    """Tokens around a few shared directions and a question of a few random token embeddings."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, per_frame // 6), dim, generator=g, dtype=torch.float64)
    pick = torch.randint(0, centres.shape[0], (frames, per_frame), generator=g)
    x = centres[pick] + 0.7 * torch.randn(frames, per_frame, dim, generator=g, dtype=torch.float64)
    question = torch.randn(words, dim, generator=g, dtype=torch.float64)
    return x.to(dtype), question.to(dtype)


# ----------------------------------------------------------------------------------------------
# Equality with the literal reference

CASES = [(1, 49, 16, 0.25, "frame"), (3, 49, 16, 0.1, "frame"), (2, 36, 8, 0.5, "frame"), (1, 16, 4, 0.75, "frame"),
         (2, 25, 8, 0.2, "video"), (3, 16, 32, 0.3, "video"), (1, 196, 16, 0.05, "frame")]


@pytest.mark.parametrize("frames,per_frame,dim,retention,scope", CASES)
def test_matches_literal_float64(frames, per_frame, dim, retention, scope):
    x, question = inputs(frames, per_frame, dim, seed=frames * 100 + per_frame + dim, dtype=torch.float64)
    ref = reference_cdpruner(x, question, retention, scope)
    assert ref.gap > 1e-12 and ref.margin > 1e-9, "input too close to a tie for float64"
    out = cdpruner_compress(x, question, retention, scope)
    assert out.positions.tolist() == ref.keep
    assert torch.equal(out.tokens, ref.output)
    rel = cdpruner_relevance(x, question)
    torch.testing.assert_close(rel.flatten(), torch.tensor(ref.relevance, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if scope == "frame":  # the same picks in the same order
        k = max(1, round(retention * per_frame))
        assert cdpruner_select(x, rel, k).tolist() == ref.picks


@pytest.mark.parametrize("theta,sign", [(0.5, -1), (0.0, -1), (0.9, 1), (None, 1)])
def test_theta_and_sign_match_literal(theta, sign):
    x, question = inputs(2, 36, 8, seed=7, dtype=torch.float64)
    ref = reference_cdpruner(x, question, 0.3, theta=theta, sign=sign)
    assert ref.gap > 1e-12
    assert cdpruner_compress(x, question, 0.3, theta=theta, relevance_sign=sign).positions.tolist() == ref.keep


@pytest.mark.parametrize("frames,per_frame,dim,scope", [(2, 196, 64, "frame"), (4, 49, 32, "frame"),
                                                         (2, 49, 32, "video")])
def test_matches_literal_float32(frames, per_frame, dim, scope):
    for seed in range(20):
        x, question = inputs(frames, per_frame, dim, seed=seed)
        ref = reference_cdpruner(x, question, 0.25, scope)
        if ref.gap < SAFE or ref.margin < SAFE:
            continue  # a pick float32 may take the other way
        out = cdpruner_compress(x, question, 0.25, scope)
        assert out.tokens.dtype == torch.float32 and torch.equal(out.tokens, ref.output)
        return
    pytest.fail("no input with safe margins")


# ----------------------------------------------------------------------------------------------
# Structured inputs


def onehot(index: int, dim: int = 4, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.eye(dim, dtype=torch.float64)[index]


def test_hand_example_negated_relevance_duplicates_and_the_fallback():
    # question e0. Raw relevance -cos: x0 = e0 -> -1 (the minimum), x1 = e1 and x3 = 2 e1 -> 0,
    # x2 = -e0 -> +1 (the maximum); normalised: x0 ~0, x1 = x3 ~0.5, x2 ~1.
    # Pick 1: x2 (largest L_ii). It is -x0: x0's gain drops to exactly 0. Pick 2: x1 (tied with x3, lower
    # index); x3's gain drops to 0. No candidate left: x3 (more relevant than x0), then x0.
    x = torch.stack([onehot(0), onehot(1), -onehot(0), onehot(1, scale=2.0)])[None]
    question = onehot(0)[None]
    rel = cdpruner_relevance(x, question)
    assert rel[0, 0] < 1e-5 and rel[0, 1] == rel[0, 3] and rel[0, 2] > 1
    assert cdpruner_select(x, rel, 4)[0].tolist() == [2, 1, 3, 0]
    assert reference_dpp(x[0], rel[0].tolist(), 4)[0] == [2, 1, 3, 0]
    assert cdpruner_compress(x, question, 0.5).positions.tolist() == [1, 2]
    # the paper's sign: x0 is the most relevant, x2 the least
    assert cdpruner_select(x, cdpruner_relevance(x, question, sign=1), 4)[0].tolist() == [0, 1, 3, 2]


def test_more_picks_than_dimensions_fall_back_to_relevance():
    # 4-dimensional tokens: after 4 DPP picks every other token lies in their span (gain ~0)
    x, question = inputs(1, 16, 4, seed=8, dtype=torch.float64)
    rel = cdpruner_relevance(x, question)
    picks = cdpruner_select(x, rel, 12)[0].tolist()
    ref, _, _ = reference_dpp(x[0], rel[0].tolist(), 12)
    assert picks == ref and len(set(picks)) == 12
    rest = sorted(set(range(16)) - set(picks[:4]), key=lambda i: (-rel[0, i].item(), i))
    assert picks[4:] == rest[:8]
    out = cdpruner_compress(x.float(), question.float(), 0.75)  # float32 too: no NaN, 12 distinct tokens
    assert out.positions.unique().numel() == 12 and not torch.isnan(out.tokens).any()
    assert out.positions.tolist() == sorted(picks)


def test_zero_and_duplicate_tokens_are_picked_last():
    x, question = inputs(1, 12, 16, seed=9, dtype=torch.float64)  # 10 distinct directions in 16 dimensions
    x[0, 4] = 0
    x[0, 9] = 3 * x[0, 2]  # a duplicate direction (same relevance)
    rel = cdpruner_relevance(x, question)
    picks = cdpruner_select(x, rel, 12)[0].tolist()
    assert picks == reference_dpp(x[0], rel[0].tolist(), 12)[0]
    assert set(picks[-2:]) == {4, 9} or set(picks[-2:]) == {4, 2}  # one of the pair, and the zero token
    assert not torch.isnan(cdpruner_compress(x, question, 0.5).tokens).any()


def test_equal_relevance_is_one_and_ties_go_to_the_lower_index():
    x = onehot(1).expand(2, 6, 4).clone()  # every token the same: rel max == min -> 1 everywhere
    question = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(cdpruner_relevance(x, question), torch.ones(2, 6, dtype=torch.float64))
    assert reference_relevance(x.flatten(0, 1), question) == [1.0] * 12
    assert cdpruner_compress(x, question, 0.5).positions.tolist() == [0, 1, 2, 6, 7, 8]
    one = torch.randn(1, 1, 4)
    assert torch.equal(cdpruner_compress(one, question.float(), 0.5).tokens, one[0])


def test_one_frame_counts_and_full_retention():
    x, question = inputs(3, 196, 8, seed=10)
    for retention, k in ((0.001, 1), (0.05, 10), (0.125, 24), (0.25, 49)):  # round(24.5) = 24: half to even
        assert cdpruner_compress(x, question, retention).tokens.shape == (3 * k, 8)
        assert cdpruner_compress(x[:1], question, retention).tokens.shape == (k, 8)
    x, question = inputs(2, 49, 16, seed=11)
    for scope in ("frame", "video"):
        out = cdpruner_compress(x, question, 1.0, scope)
        assert torch.equal(out.tokens, x.flatten(0, 1)) and torch.equal(out.positions, torch.arange(98))
        assert cdpruner_compress(x, question, 0.3, scope).tokens.shape == (
            (29 if scope == "video" else 2 * 15), 16)  # round(29.4), 2 * round(14.7)


def test_output_is_in_original_order_and_the_relevance_range_is_video_wide():
    x, question = inputs(4, 49, 8, seed=12)
    out = cdpruner_compress(x, question, 0.2)
    assert bool((out.positions.diff() > 0).all()) and torch.equal(out.tokens, x.flatten(0, 1)[out.positions])
    rel = cdpruner_relevance(x.double(), question.double())
    assert rel.max() - 1 == pytest.approx(rel.min(), rel=1e-6)  # (max - min + 1e-6) / (max - min) - 1
    per_frame_min = rel.amin(dim=1)
    assert (per_frame_min > rel.min()).sum() == 3


def test_bfloat16_input_decides_in_float32():
    x, question = inputs(2, 49, 16, seed=13)
    out = cdpruner_compress(x.bfloat16(), question.bfloat16(), 0.3)
    assert out.tokens.dtype == torch.bfloat16
    same = cdpruner_compress(x.bfloat16().float(), question.bfloat16().float(), 0.3)
    assert torch.equal(out.positions, same.positions)


def test_input_is_not_modified():
    x, question = inputs(2, 49, 16, seed=14)
    before = x.clone(), question.clone()
    cdpruner_compress(x, question, 0.25)
    assert torch.equal(x, before[0]) and torch.equal(question, before[1])


# ----------------------------------------------------------------------------------------------
# Knobs and the compressor


@pytest.mark.parametrize("knobs, message", [
    ({"retention": 0}, r"cdpruner.retention=0: expected a value in \(0.0, 1.0\]"),
    ({"retention": float("nan")}, "cdpruner.retention=nan"),
    ({"scope": "clip"}, "cdpruner.scope='clip': expected one of frame, video"),
    ({"theta": 1.0}, r"cdpruner.theta=1.0: expected a value in \[0.0, 1.0\) or null"),
    ({"theta": -0.5}, "cdpruner.theta=-0.5"),
    ({"relevance_sign": 0}, "cdpruner.relevance_sign=0: expected one of -1, 1"),
    ({"positions": "kept"}, "cdpruner.positions='kept': expected one of compact, original or null"),
])
def test_rejects_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=message):
        CDPruner(**knobs)
    if "positions" in knobs:
        return  # a knob of the compressor only
    with pytest.raises(ValueError, match=message):
        cdpruner_compress(torch.randn(2, 4, 8), torch.randn(3, 8), **{"retention": 0.5, **knobs})


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="question: expected a non-empty"):
        cdpruner_compress(torch.randn(2, 4, 8), torch.randn(0, 8), 0.25)
    with pytest.raises(ValueError, match=r"question embeddings \(3, 6\) do not match the features' width 8"):
        cdpruner_compress(torch.randn(2, 4, 8), torch.randn(3, 6), 0.25)
    with pytest.raises(ValueError, match="cdpruner needs the question's token embeddings"):
        CDPruner().compress(VisualInput(torch.randn(2, 196, 8), (14, 14)))


def test_registered_reads_the_question_and_follows_the_model_s_position_rule():
    method = methods.build("cdpruner", retention=0.3)
    assert isinstance(method, CDPruner) and method.stages == {"visual"} and method.needs == {"question"}
    assert method.retention_knob.knob == "retention" and method.retention_knob.direct
    assert method.reads_question_before_llm and not method.shares_prefix
    x, question = inputs(3, 196, 16, seed=15)
    expected = cdpruner_compress(x, question, 0.3)
    assert torch.equal(method.compress(VisualInput(x, (14, 14), question=question)), expected.tokens)
    out = method.compress(VisualInput(x, (14, 14), patch_grid=(28, 28), mrope=True, question=question))
    assert isinstance(out, VideoTokens) and torch.equal(out.positions, expected.positions)
    out = CDPruner(retention=0.3, positions="original").compress(VisualInput(x, (14, 14), question=question))
    assert isinstance(out, VideoTokens) and torch.equal(out.positions, expected.positions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    for seed in range(20, 40):
        x, question = inputs(4, 49, 64, seed=seed)
        ref = reference_cdpruner(x, question, 0.25)
        if ref.gap > SAFE and ref.margin > SAFE:
            out = cdpruner_compress(x.cuda(), question.cuda(), 0.25)
            assert out.tokens.is_cuda and out.positions.cpu().tolist() == ref.keep
            exhausted = cdpruner_compress(x[:, :, :4].cuda(), question[:, :4].cuda(), 0.5, scope="video")
            assert exhausted.positions.unique().numel() == 98  # past the kernel's rank: no NaN, distinct picks
            return
    pytest.fail("no input with safe margins")


# ----------------------------------------------------------------------------------------------
# Through the models


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl"])
def family(request, tiny_llava, qwen, smoke_questions):
    adapter = {"llava_onevision": tiny_llava, "qwen2_5_vl": qwen}[request.param]
    path = str(smoke_questions.parent / "videos" / "clip_003.mp4")
    return request.param, adapter, adapter.encode_video(adapter.load_video(path, 4))


def test_full_retention_reproduces_none_s_logits(family):
    _, adapter, encoded = family
    ids, _ = adapter.prompt_ids(QUESTION)
    logits = []
    for method in (CDPruner(retention=1.0), methods.build("none")):
        prompt = adapter.prompt(adapter.compress(encoded, method, QUESTION), ids)
        logits.append(adapter.prefill(prompt, method, use_cache=False).logits)
    assert torch.equal(logits[0], logits[1])  # the same tokens at the same positions: the same kernels


def test_runs_on_both_families_with_the_question_s_embeddings(family):
    """The LLM gets the pure function's output on the question's input embeddings (the smoke clips'
    plain backgrounds give identical tokens, whose choice round-off decides: the literal reference is
    compared on synthetic inputs above)."""
    name, adapter, encoded = family
    visual = encoded.visual
    method = CDPruner(retention=0.25)
    ids, _ = adapter.prompt_ids(QUESTION)
    expected = cdpruner_compress(visual.features, adapter.question_embeddings(QUESTION), 0.25)
    prompt = adapter.prompt(adapter.compress(encoded, method, QUESTION), ids)
    full = adapter.prompt(adapter.compress(encoded, methods.build("none")), ids)
    start, end = prompt.span
    frames, per_frame = visual.features.shape[:2]
    assert end - start == prompt.run.video_tokens_out == frames * max(1, round(0.25 * per_frame))
    assert torch.equal(prompt.embeds[0, start:end], expected.tokens)
    if name == "qwen2_5_vl":  # the kept tokens' own M-RoPE ids, the text after the video unmoved
        assert torch.equal(prompt.positions[..., start:end], full.positions[..., start + expected.positions])
        assert torch.equal(prompt.positions[..., end:], full.positions[..., full.span[1]:])
    else:  # consecutive
        assert torch.equal(prompt.positions[0], torch.arange(prompt.embeds.shape[1]))
    other = cdpruner_compress(visual.features, adapter.question_embeddings("Which way does it move?"), 0.25)
    assert not torch.equal(other.positions, expected.positions)  # it reads the question
    text, run = adapter.generate(encoded, QUESTION, method, max_new_tokens=2)
    assert isinstance(text, str) and run.video_tokens_out == end - start


@pytest.mark.slow
def test_runs_in_the_harness(cfg_factory):
    from tests.helpers import run_config

    cfg = cfg_factory("+method=cdpruner", "retention=0.25", "method.scope=video", "task.limit=2")
    summary = json.loads((run_config(cfg) / "summary.json").read_text())
    assert summary["method"] == "cdpruner"
    assert summary["knobs"] == {"retention": 0.25, "scope": "video", "theta": None, "relevance_sign": -1,
                                 "positions": None}
    assert summary["retention"]["rho_tok"]["mean"] == pytest.approx(0.25, abs=1 / 196)
