"""methods/vispruner.py against VisPruner's official `encode_images` as its docstring states it and its
literal restatement.

The literal reference (tests/reference/vispruner.py) runs the matching rounds over Python lists in
float64; float64 input makes the implementation decide in float64 too. Every near tie among a round's
A-scores matters (the order sets the next A/B split), so float32 comparisons use inputs whose sorted
scores are at least SAFE apart. Structured inputs (one-hot tokens) have exact cosines.
"""

from __future__ import annotations

import json

import pytest
import torch

import methods
from methods.core.base import VideoTokens, VisualInput
from methods.topk import pooled_scores
from methods.vispruner import VisPruner, vispruner_compress, vispruner_select, vispruner_split
from tests.reference.vispruner import reference_select, reference_split, reference_vispruner

SAFE = 1e-5
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def inputs(frames: int, per_frame: int, dim: int, seed: int, dtype=torch.float32):
    """Tokens around a few shared directions (near duplicates occur) and distinct random scores."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, per_frame // 6), dim, generator=g, dtype=torch.float64)
    pick = torch.randint(0, centres.shape[0], (frames, per_frame), generator=g)
    x = centres[pick] + 0.7 * torch.randn(frames, per_frame, dim, generator=g, dtype=torch.float64)
    scores = torch.rand(frames, per_frame, generator=g, dtype=torch.float64)
    return x.to(dtype), scores.to(dtype)


# ----------------------------------------------------------------------------------------------
# Equality with the literal reference

CASES = [(1, 196, 16, 0.25, "frame"), (3, 49, 16, 0.1, "frame"), (2, 196, 8, 0.05, "frame"), (4, 49, 8, 0.5, "frame"),
         (2, 63, 8, 0.3, "frame"), (1, 16, 4, 0.6, "frame"), (3, 49, 16, 0.2, "video"), (2, 45, 8, 0.1, "video")]


@pytest.mark.parametrize("frames,per_frame,dim,retention,scope", CASES)
def test_matches_literal_float64(frames, per_frame, dim, retention, scope):
    x, scores = inputs(frames, per_frame, dim, seed=frames * 100 + per_frame + dim, dtype=torch.float64)
    ref = reference_vispruner(x, scores, retention, scope=scope)
    assert ref.gap > 1e-12 and ref.rounds > 0, "input too close to a tie for float64, or no round"
    out = vispruner_compress(x, scores, retention, scope=scope)
    assert out.positions.tolist() == ref.keep
    assert torch.equal(out.tokens, ref.output)


@pytest.mark.parametrize("ratio,step", [(0.0, 8), (1.0, 8), (0.3, 3), (0.5, 1), (0.7, 20)])
def test_other_knobs_match_literal(ratio, step):
    x, scores = inputs(2, 49, 8, seed=int(ratio * 10) + step, dtype=torch.float64)
    ref = reference_vispruner(x, scores, 0.3, ratio, step)
    assert ref.gap > 1e-12
    assert vispruner_compress(x, scores, 0.3, ratio, step).positions.tolist() == ref.keep


@pytest.mark.parametrize("frames,per_frame,dim,scope", [(2, 196, 32, "frame"), (4, 49, 16, "frame"),
                                                         (2, 49, 16, "video")])
def test_matches_literal_float32(frames, per_frame, dim, scope):
    for seed in range(20):
        x, scores = inputs(frames, per_frame, dim, seed=seed)
        ref = reference_vispruner(x, scores, 0.25, scope=scope)
        if ref.gap < SAFE:
            continue  # two A-scores of a round that float32 may order the other way
        out = vispruner_compress(x, scores, 0.25, scope=scope)
        assert out.tokens.dtype == torch.float32 and torch.equal(out.tokens, ref.output)
        return
    pytest.fail("no input with safe margins")


# ----------------------------------------------------------------------------------------------
# Budgets, counts, structured inputs


def test_split_is_int_of_the_ratio_made_even():
    for n in (196, 195, 16, 315, 1):
        for k in range(1, n + 1):
            for ratio in (0.0, 0.3, 0.5, 1.0):
                k_imp, k_div = vispruner_split(k, n, ratio)
                assert (k_imp, k_div) == reference_split(k, n, ratio)
                assert k_imp + k_div == k and k_div >= 0 and k_imp >= int(k * ratio)
                assert (n - k_imp) % 2 == 0 or k_imp == k
    assert vispruner_split(64, 576, 0.5) == (32, 32)  # the official LLaVA-1.5 setting: unchanged
    assert vispruner_split(39, 196, 0.5) == (20, 19)  # official int(19.5) = 19 leaves |R| = 177: odd
    assert vispruner_split(49, 196, 0.5) == (24, 25)


@pytest.mark.parametrize("frames", [1, 3])
def test_exact_token_counts(frames):
    x, scores = inputs(frames, 196, 8, seed=frames)
    for retention in (0.001, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 0.9, 1.0):
        k = max(1, round(retention * 196))
        assert vispruner_compress(x, scores, retention).tokens.shape == (frames * k, 8)
        kv = max(1, round(retention * frames * 196))
        assert vispruner_compress(x, scores, retention, scope="video").tokens.shape == (kv, 8)
    keep = vispruner_select(x, scores, 37)
    assert keep.shape == (frames, 37) and all(len(set(row)) == 37 for row in keep.tolist())


def onehot(index: int, dim: int = 8, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.eye(dim, dtype=torch.float64)[index]


def test_hand_example_a_capped_round_and_an_odd_residual():
    # scores order the tokens 0..7; k = 4: k_imp = 2 (8 - 2 is even), k_div = 2, R = [2, ..., 7].
    # Round 1: A = [2, 4, 6], B = [3, 5, 7]; min(8, 6 - 2, |A| = 3) = 3 drops all of A -> R = [3, 5, 7].
    # Round 2 (odd R): A = [3, 7], B = [5]; token 3 duplicates 5 (cos 1), token 7 is orthogonal to it:
    # 3 is dropped -> R = [7, 5]. Kept: 0, 1, 5, 7.
    x = torch.stack([onehot(0), onehot(1), onehot(2), onehot(3, scale=2.0), onehot(4), onehot(3), onehot(5),
                     onehot(6)])
    scores = torch.arange(8, 0, -1, dtype=torch.float64)
    assert vispruner_select(x[None], scores[None], 4)[0].tolist() == [0, 1, 5, 7]
    assert reference_select(x, scores, 4) == ([0, 1, 5, 7], 0.0, 2)  # round 1: three exact ties at 0


def test_dropped_a_tokens_are_the_duplicates_and_the_rest_is_reordered_by_score():
    # k_imp = 0 (ratio 0), n = 6, k = 3, step 1: R = [0, ..., 5] (scores descending).
    # Round 1: A = [0, 2, 4], B = [1, 3, 5]; 4 duplicates 5 (1.0), 0 is at 0.8 to 1 and 3, 2 at 0
    #   -> drop 4, R = [0, 2] (descending score) + [1, 3, 5].
    # Round 2: A = [0, 1, 5], B = [2, 3]; 1 and 3 are one direction (1.0), 0 at 0.8, 5 at 0
    #   -> drop 1, R = [0, 5] + [2, 3].
    x = torch.tensor([[0.6, 0.8, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 3.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    scores = torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64)
    keep, _, rounds = reference_select(x, scores, 3, important_ratio=0.0, step=1)
    assert rounds == 3
    assert vispruner_select(x[None], scores[None], 3, important_ratio=0.0, step=1)[0].tolist() == keep
    # Round 3: A = [0, 2], B = [5, 3]: 0 has cos 0.8 with 3, 2 has 0 -> drop 0: kept 2, 3, 5
    assert keep == [2, 3, 5]


def test_equal_scores_go_to_the_lower_index():
    x, _ = inputs(1, 49, 8, seed=11, dtype=torch.float64)
    scores = torch.zeros(1, 49, dtype=torch.float64)
    scores[0, [7, 30, 3, 40]] = 1.0  # four tied maxima
    keep = vispruner_select(x, scores, 10, important_ratio=0.4)[0].tolist()  # k_imp = 4
    assert {3, 7, 30, 40} <= set(keep)
    assert keep == reference_select(x[0], scores[0], 10, important_ratio=0.4)[0]
    flat = vispruner_select(x, torch.zeros(1, 49, dtype=torch.float64), 10, important_ratio=1.0)[0]
    assert flat.tolist() == list(range(10))  # all tied: the first ten


def test_identical_tokens_and_zero_tokens():
    x = onehot(2).expand(1, 40, 8).clone()
    x[0, [5, 17]] = 0  # cosine 0 with everything (official: NaN)
    scores = torch.linspace(1, 0, 40, dtype=torch.float64)[None]
    for k in (4, 8, 13, 30):  # every A-score is exactly 1 or 0: all ties, broken by A position
        assert vispruner_select(x, scores, k)[0].tolist() == reference_select(x[0], scores[0], k)[0]
    assert 5 in vispruner_select(x, scores, 8)[0].tolist()  # a zero token duplicates nothing
    y = vispruner_compress(x.float(), scores.float(), 0.25)
    assert not torch.isnan(y.tokens).any()


def test_one_frame_one_token_and_full_retention():
    x, scores = inputs(1, 1, 4, seed=12)
    assert torch.equal(vispruner_compress(x, scores, 0.5).tokens, x[0])
    x, scores = inputs(3, 49, 8, seed=13)
    for scope in ("frame", "video"):
        out = vispruner_compress(x, scores, 1.0, scope=scope)
        assert torch.equal(out.tokens, x.flatten(0, 1)) and torch.equal(out.positions, torch.arange(3 * 49))


def test_output_is_in_original_order():
    x, scores = inputs(4, 196, 8, seed=14)
    out = vispruner_compress(x, scores, 0.2)
    assert bool((out.positions.diff() > 0).all()) and torch.equal(out.tokens, x.flatten(0, 1)[out.positions])
    assert (out.positions // 196).tolist() == sorted(f for f in range(4) for _ in range(39))


def test_bfloat16_input_decides_in_float32():
    x, scores = inputs(2, 49, 16, seed=15)
    out = vispruner_compress(x.bfloat16(), scores, 0.3)
    assert out.tokens.dtype == torch.bfloat16
    assert torch.equal(out.positions, vispruner_compress(x.bfloat16().float(), scores, 0.3).positions)


def test_input_is_not_modified():
    x, scores = inputs(2, 49, 16, seed=16)
    before = x.clone(), scores.clone()
    vispruner_compress(x, scores, 0.25)
    assert torch.equal(x, before[0]) and torch.equal(scores, before[1])


# ----------------------------------------------------------------------------------------------
# Knobs and the compressor


@pytest.mark.parametrize("knobs, message", [
    ({"retention": 0}, r"vispruner.retention=0: expected a value in \(0.0, 1.0\]"),
    ({"retention": float("nan")}, "vispruner.retention=nan"),
    ({"important_ratio": 1.5}, r"vispruner.important_ratio=1.5: expected a value in \[0.0, 1.0\]"),
    ({"important_ratio": -0.1}, "vispruner.important_ratio=-0.1"),
    ({"step": 0}, r"vispruner.step=0: expected an integer in \[1, inf\]"),
    ({"step": 2.5}, "vispruner.step=2.5: expected an integer"),
    ({"scope": "clip"}, "vispruner.scope='clip': expected one of frame, video"),
])
def test_rejects_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=message):
        VisPruner(**knobs)
    with pytest.raises(ValueError, match=message):
        vispruner_compress(torch.randn(2, 4, 8), torch.rand(2, 4), **{"retention": 0.5, **knobs})


def test_rejects_bad_positions():
    with pytest.raises(ValueError, match="vispruner.positions='kept': expected one of compact, original or null"):
        VisPruner(positions="kept")


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="features"):
        vispruner_compress(torch.randn(4, 8), torch.rand(4), 0.25)
    with pytest.raises(ValueError, match=r"scores \(2, 5\) do not match features \(2, 4, 8\)"):
        vispruner_compress(torch.randn(2, 4, 8), torch.rand(2, 5), 0.25)
    with pytest.raises(ValueError, match="needs the vision encoder's patch attention"):
        VisPruner().compress(VisualInput(torch.randn(2, 196, 8), (14, 14)))


def test_registered_on_pooled_scores_with_the_model_s_position_rule():
    method = methods.build("vispruner", retention=0.3, important_ratio=0.4)
    assert isinstance(method, VisPruner) and method.stages == {"visual"} and method.needs == {"patch_scores"}
    assert method.retention_knob.knob == "retention" and method.retention_knob.direct
    x, _ = inputs(3, 196, 16, seed=17)
    patch = torch.rand(3, 729)
    expected = vispruner_compress(x, pooled_scores(patch, (14, 14)), 0.3, 0.4)
    assert torch.equal(method.compress(VisualInput(x, (14, 14), patch)), expected.tokens)
    qwen_patch = torch.rand(3, 28 * 28)  # Qwen2.5-VL: the mean of each token's 2x2 patches
    mean = qwen_patch.view(3, 14, 2, 14, 2).mean(dim=(2, 4)).flatten(1)
    out = method.compress(VisualInput(x, (14, 14), qwen_patch, patch_grid=(28, 28), mrope=True))
    assert isinstance(out, VideoTokens)
    assert torch.equal(out.positions, vispruner_compress(x, mean, 0.3, 0.4).positions)
    out = VisPruner(retention=0.3, important_ratio=0.4, positions="original").compress(VisualInput(x, (14, 14), patch))
    assert isinstance(out, VideoTokens) and torch.equal(out.tokens, expected.tokens)
    out = VisPruner(retention=0.3, important_ratio=0.4, positions="compact").compress(
        VisualInput(x, (14, 14), qwen_patch, patch_grid=(28, 28), mrope=True))
    assert not isinstance(out, VideoTokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    for seed in range(20, 40):
        x, scores = inputs(2, 196, 32, seed=seed)
        ref = reference_vispruner(x, scores, 0.25)
        if ref.gap > SAFE:
            out = vispruner_compress(x.cuda(), scores.cuda(), 0.25)
            assert out.tokens.is_cuda and out.positions.cpu().tolist() == ref.keep
            assert vispruner_compress(x.cuda(), scores.cuda(), 0.25, scope="video").tokens.shape == (98, 32)
            return
    pytest.fail("no input with safe margins")


# ----------------------------------------------------------------------------------------------
# Through the models


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl"])
def family(request, tiny_llava, qwen, smoke_questions):
    adapter = {"llava_onevision": tiny_llava, "qwen2_5_vl": qwen}[request.param]
    path = str(smoke_questions.parent / "videos" / "clip_003.mp4")
    return request.param, adapter, adapter.encode_video(adapter.load_video(path, 4), frozenset({"patch_scores"}))


def test_full_retention_reproduces_none_s_logits(family):
    _, adapter, encoded = family
    ids, _ = adapter.prompt_ids(QUESTION)
    logits = []
    for method in (VisPruner(retention=1.0), methods.build("none")):
        prompt = adapter.prompt(adapter.compress(encoded, method), ids)
        logits.append(adapter.prefill(prompt, method, use_cache=False).logits)
    assert torch.equal(logits[0], logits[1])  # the same tokens at the same positions: the same kernels


def test_runs_on_both_families_with_their_position_rule(family):
    """The LLM gets the pure function's output on the encoder's own pooled scores (the smoke clips'
    plain backgrounds give identical tokens, whose choice round-off decides: the literal reference is
    compared on synthetic inputs above)."""
    name, adapter, encoded = family
    visual = encoded.visual
    method = VisPruner(retention=0.25)
    ids, _ = adapter.prompt_ids(QUESTION)
    scores = pooled_scores(visual.patch_scores, visual.grid, visual.patch_grid)
    expected = vispruner_compress(visual.features, scores, 0.25)
    prompt = adapter.prompt(adapter.compress(encoded, method), ids)
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
    text, run = adapter.generate(encoded, QUESTION, method, max_new_tokens=2)
    assert isinstance(text, str) and run.video_tokens_out == end - start


@pytest.mark.slow
def test_runs_in_the_harness(cfg_factory):
    from tests.helpers import run_config

    cfg = cfg_factory("+method=vispruner", "retention=0.25", "method.important_ratio=0.4", "task.limit=2")
    summary = json.loads((run_config(cfg) / "summary.json").read_text())
    assert summary["method"] == "vispruner"
    assert summary["knobs"] == {"retention": 0.25, "important_ratio": 0.4, "step": 8, "scope": "frame",
                                 "positions": None}
    assert summary["retention"]["rho_tok"]["mean"] == pytest.approx(49 / 196)
