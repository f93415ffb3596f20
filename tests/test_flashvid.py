"""FlashVID (methods/flashvid.py): the visual stage against its literal restatement
(tests/reference/flashvid.py, float64 loops written from the official code) and the golden file;
counts, segments, ADTS and the temporal trees on hand-made inputs; the prefill stage against the
stock transformers model pruned by hand (cached decoding included) on the tiny LLaVA-OneVision;
the official Qwen2.5-VL setting on the small Qwen2.5-VL.

The implementation decides in float32, the reference in float64: equality tests use inputs whose
decisions are at least SAFE away from flipping (the reference reports its smallest margin).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import methods
from methods.core import decoder
from methods.core.base import VideoTokens, VisualInput
from methods.core.flops import LLMShape, retention_numbers
from methods.core.similarity import unit_rows
from methods.flashvid import (
    FlashVID,
    adts_select,
    budgets,
    flashvid_compress,
    flashvid_visual,
    pruned_count,
    segment_bounds,
    temporal_trees,
)
from methods.topk import pooled_scores
from tests.helpers.tolerance import close
from tests.reference.flashvid import reference_flashvid

GOLDEN = Path(__file__).parent / "golden" / "flashvid_golden.pt"
SAFE = 1e-5
FRAMES = 4
LAYERS = 8  # the tiny smoke model and the small Qwen2.5-VL
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def video(frames: int, n: int, dim: int, seed: int, scenes: list[int] | None = None, noise: float = 0.3,
          offset: float = 0.5):
    """Structured features: per scene, tokens around shared centroids (plus `offset`, so the event
    relevance is mostly positive); each frame its scene plus `noise`. Random attention scores."""
    g = torch.Generator().manual_seed(seed)
    scenes = scenes if scenes is not None else [0] * frames
    centroids = torch.randn(max(2, n // 4), dim, generator=g, dtype=torch.float64) + offset
    protos = [centroids[torch.randint(0, centroids.shape[0], (n,), generator=g)]
              + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64) for _ in range(max(scenes) + 1)]
    x = torch.stack([protos[s] + noise * torch.randn(n, dim, generator=g, dtype=torch.float64) for s in scenes])
    return x.float(), torch.rand(frames, n, generator=g).softmax(-1)


def random_video(frames: int, n: int, dim: int, seed: int):
    """Zero-mean random features: the event relevance has either sign (v2 may pick a token twice)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, n, dim, generator=g), torch.rand(frames, n, generator=g)


def assert_matches(out, ref, rtol=1e-5):
    assert out.positions.tolist() == ref.positions, "a different kept set"
    scale = float(ref.tokens.abs().max()) if ref.tokens.numel() else 1.0
    torch.testing.assert_close(out.tokens.double(), ref.tokens, rtol=rtol, atol=rtol * scale)


# ---- equality with the literal reference -------------------------------------------------------------
TWO_SCENES = [0, 0, 0, 1, 1, 1]
CASES = {  # name: (input, knobs)
    "one frame": (lambda s: video(1, 49, 16, s), {}),
    "two scenes": (lambda s: video(6, 49, 16, s, TWO_SCENES), {"min_segments": 2}),
    "official min 8 segments": (lambda s: video(10, 49, 16, s, [0] * 5 + [1] * 5), {}),
    "attn_div (v1)": (lambda s: video(6, 49, 16, s, TWO_SCENES), {"selection": "attn_div", "min_segments": 4}),
    "soft threshold": (lambda s: video(6, 49, 16, s, noise=0.05), {"min_segments": 1, "temporal_threshold": 0.5,
                                                                   "alpha": 0.3}),
    "no temporal merge": (lambda s: video(5, 49, 16, s), {"min_segments": 1, "temporal_threshold": 1.0}),
    "alpha 0": (lambda s: video(5, 49, 16, s, [0, 0, 1, 1, 1]), {"alpha": 0.0, "min_segments": 1}),
    "alpha 1": (lambda s: video(5, 49, 16, s), {"alpha": 1.0, "min_segments": 1}),
    "budget capped at N": (lambda s: video(4, 49, 16, s), {"retention": 1.0, "min_segments": 2}),
    "v2 picks twice": (lambda s: random_video(4, 49, 16, s), {"retention": 0.8, "min_segments": 1,
                                                             "segment_threshold": -1.0}),
    "full grid": (lambda s: video(3, 196, 16, s), {"min_segments": 1, "retention": 0.1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_literal_reference(case):
    make, knobs = CASES[case]
    for seed in range(4):  # seed 0 has safe margins for every case (checked)
        x, scores = make(seed)
        ref = reference_flashvid(x, scores, **knobs)
        if ref.margin < SAFE:
            continue  # a decision float32 round-off may legitimately flip
        out = flashvid_visual(x, scores, **knobs)
        assert out.segments == ref.segments and out.budget == ref.budget
        assert out.selected.tolist() == ref.selected and out.roots == ref.roots
        assert out.tokens.dtype == torch.float32 and out.positions.dtype == torch.long
        assert_matches(out, ref)
        return
    pytest.fail("no input with safe margins")


def test_v2_may_pick_a_token_twice_as_official():
    # zero-mean features: about half the tokens have a negative relevance e_j, so once the positive
    # ones are picked the best score is a picked token's 0 (A = 35 here)
    x, scores = random_video(4, 49, 16, 0)
    out = flashvid_visual(x, scores, 0.8, min_segments=1, segment_threshold=-1.0)
    picks = out.selected.tolist()
    assert any(len(set(row)) < len(row) for row in picks)  # duplicated picks ...
    assert out.positions.diff().min() == 0  # ... are output twice, at the same index
    v1 = flashvid_visual(x, scores, 0.8, min_segments=1, segment_threshold=-1.0, selection="attn_div")
    assert all(len(set(row)) == len(row) for row in v1.selected.tolist())


@pytest.mark.parametrize("scenes,seed", [(TWO_SCENES, 7), ([0, 1, 2, 3, 4, 5], 0)])  # trees; whole frames
def test_seeded_noise_matches_reference_with_the_same_draws(scenes, seed):
    # (frames with a few roots cluster with k = 1 or 2, where densities tie up to the noise and
    # float32 resolves the noise coarsely: most inputs of the first kind have unsafe margins)
    knobs = {"retention": 0.5, "min_segments": 2}
    x, scores = video(6, 49, 16, seed, scenes)
    ref = reference_flashvid(x, scores, **knobs, noise_seed=4)
    assert ref.margin > SAFE
    out = flashvid_visual(x, scores, **knobs, generator=torch.Generator().manual_seed(4))
    assert_matches(out, ref)


def test_noise_breaks_exact_density_ties_by_the_seed():
    # a one-frame segment of pairs of equal tokens: every density ties with its twin, and
    # k = min(c, 7) = 1 makes every density exactly 1: only the noise picks the centres
    half = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    x = torch.cat([half, half], dim=1)
    scores = torch.full((1, 8), 1 / 8)
    # B = ceil(8 * 0.25 * 1) = 2, A = ceil(0.5 * 2) = 1, S = 1: one cluster of the 8 tokens
    runs = [flashvid_visual(x, scores, 0.25, 1.0, 0.5, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1, 2, 3, 4)]
    assert all(r.tokens.shape[0] == 2 for r in runs)
    assert torch.equal(runs[0].positions, runs[1].positions)
    assert len({tuple(r.positions.tolist()) for r in runs}) > 1


def test_golden_values():
    golden = torch.load(GOLDEN)
    out = flashvid_visual(golden["features"].float(), golden["scores"].float(), **golden["knobs"],
                          generator=torch.Generator().manual_seed(golden["noise_seed"]))
    assert out.segments == [tuple(s) for s in golden["segments"]] and out.roots == golden["roots"]
    assert out.positions.tolist() == golden["positions"].tolist()
    torch.testing.assert_close(out.tokens, golden["expected"], rtol=0, atol=1e-5)


# ---- budgets, counts, segments ---------------------------------------------------------------------
def test_budgets_follow_the_official_expression():
    assert budgets(196, 0.25, 1.25, 0.7) == (62, 44, 18)  # ceil(61.25), ceil(43.4)
    assert budgets(196, 0.10, 1.25, 0.7) == (25, 18, 7)
    assert budgets(196, 0.20, 1.25, 0.7) == (49, 35, 14)
    assert budgets(196, 1.0, 1.25, 0.7) == (196, 138, 58)  # capped at N (official: B = 245 fails)
    assert budgets(196, 0.25, 1.25, 0.0) == (62, 0, 62)
    assert budgets(196, 0.25, 1.25, 1.0) == (62, 62, 0)
    assert budgets(16, 0.25, 1.25, 0.7) == (5, 4, 1)  # a Qwen2.5-VL-sized frame


def test_pruned_count_is_the_official_ceiling():
    assert pruned_count(0.3, 620) == [186]
    assert pruned_count(0.3, 1984) == [596]  # 1984 * 0.3 = 595.19999...
    assert pruned_count(0.3, 1) == [1] and pruned_count(1.0, 77) == [77]


def exact_count(roots: list[int], bounds, per_frame: int, count: int, rest: int) -> int:
    """F*A + per frame ceil(n*gamma) (or n where gamma >= 1), gamma = S*|G| / roots of G."""
    total = len(roots) * count
    for s, e in bounds:
        gamma = rest * (e - s) / sum(roots[s:e])
        total += sum(math.ceil(n * gamma) if gamma < 1 else n for n in roots[s:e])
    return total


@pytest.mark.parametrize("knobs,expected_roots", [
    # one segment of 6 frames, no temporal merge: every non-ADTS token (v1: 49 - A distinct) is a root
    ({"temporal_threshold": 1.0, "selection": "attn_div", "min_segments": 1}, [49 - 12] * 6),
    # six one-frame segments: each whole frame is clustered (the official single-frame branch)
    ({"min_segments": 8}, [49] * 6),
])
def test_exact_token_counts(knobs, expected_roots):
    x, scores = video(6, 49, 16, 1)
    out = flashvid_visual(x, scores, 0.25, **knobs)
    budget, count, rest = out.budget
    assert (budget, count, rest) == (16, 12, 4)  # ceil(49 * 0.3125) = 16, ceil(11.2) = 12
    assert out.roots == expected_roots
    expected = exact_count(out.roots, out.segments, 49, count, rest)
    assert out.tokens.shape[0] == expected == sum(out.clusters) + 6 * count
    # per segment between B*|G| and B*|G| + |G| - 1 (each frame's ceiling adds less than one)
    assert 6 * budget <= expected < 6 * budget + 6


def test_a_still_video_merges_every_frame_into_the_first():
    # six equal frames: every non-ADTS token of frames 1..5 merges into the same token of the frame
    # before (cos 1 > 0.8, fewer merges than allowed), so the first frame holds all the roots
    x, scores = video(1, 49, 16, 2)
    x, scores = x.expand(6, -1, -1).clone(), scores.expand(6, -1).clone()
    out = flashvid_visual(x, scores, 0.25, min_segments=1)
    assert out.segments == [(0, 6)] and out.roots == [49 - 12] + [0] * 5
    assert out.clusters == [math.ceil(37 * (4 * 6 / 37))] + [0] * 5
    assert out.tokens.shape[0] == 6 * 12 + 24 == 6 * 16


def test_segments_cut_below_the_threshold_then_at_the_smallest_similarities():
    cos = [0.95, 0.2, 0.99, 0.5, 0.97]  # of consecutive frames: angles between 2-D unit vectors
    angles = torch.cumsum(torch.tensor([0.0] + [math.acos(c) for c in cos]), 0)
    means = torch.stack([angles.cos(), angles.sin()], 1)
    assert segment_bounds(means, 0.9, 1) == [(0, 2), (2, 4), (4, 6)]  # below 0.9: after 1 and 3
    assert segment_bounds(means, 0.9, 3) == [(0, 2), (2, 4), (4, 6)]
    assert segment_bounds(means, 0.9, 4) == [(0, 1), (1, 2), (2, 4), (4, 6)]  # + the smallest left: 0.95
    assert segment_bounds(means, 0.9, 5) == [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)]
    assert segment_bounds(means, 0.0, 2) == [(0, 2), (2, 6)]  # min_segments alone: the smallest
    assert segment_bounds(means, 0.9, 100) == [(i, i + 1) for i in range(6)]  # at most F - 1 cuts
    assert segment_bounds(means[:1], 0.9, 8) == [(0, 1)]
    # cosines 0.5, 0.95, 0.95 and min_segments 8 > F: the official code would reset the cut to 1.0
    # and pick it again (an empty segment); here each transition is cut once, at most F - 1 cuts
    steps = torch.cumsum(torch.tensor([0.0, math.acos(0.5), math.acos(0.95), math.acos(0.95)]), 0)
    assert segment_bounds(torch.stack([steps.cos(), steps.sin()], 1), 0.9, 8) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # equal similarities: the earlier transition first
    assert segment_bounds(torch.ones(4, 3), 0.5, 2) == [(0, 1), (1, 4)]


def test_adts_first_pick_is_the_token_farthest_from_its_nearest_weighted_neighbour():
    # three tokens: 0 and 1 close, 2 far; equal scores: 2 is picked first (the largest distance to
    # its nearest neighbour), then 0 (the largest distance to 2; v2 weighs it by e_0 > e_1 too)
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]])
    mean = x.mean(1)
    for selection in ("attn_div", "attn_div_v2"):
        picks = adts_select(x, unit_rows(x), torch.full((1, 3), 1e-6), mean, 2, selection)
        assert picks.tolist() == [[0, 2]]


def test_tree_roots_divide_by_their_direct_children_only():
    # frame 1 = e_0, e_1, e_0 (+ a little), frame 2 = frame 1 + 0.01: tokens 0 and 2 of frame 1 merge
    # into token 0 of frame 0 (two direct children), every other token into the same token before
    e = torch.eye(3)
    second = torch.stack([e[0] + 0.01 * e[1], e[1], e[0] + 0.02 * e[2]])
    x = torch.stack([e, second, second + 0.01])
    none = torch.zeros(3, 3, dtype=torch.bool)
    trees = temporal_trees(x, unit_rows(x), none, [(0, 3)], 0.8, 1)
    assert trees.merged.tolist() == [[False] * 3, [True] * 3, [True] * 3]
    assert trees.parent[1].tolist() == [0, 1, 0] and trees.parent[2].tolist() == [0, 1, 2]
    assert [r.tolist() for r in trees.roots] == [[0, 1, 2], [], []]
    # root 0: x00 + (x10 + x20) + (x12 + x22) over 1 + 2 direct children; root 1: a chain, over 2;
    # root 2: no child
    expected = torch.stack([(x[0, 0] + x[1, 0] + x[2, 0] + x[1, 2] + x[2, 2]) / 3,
                            (x[0, 1] + x[1, 1] + x[2, 1]) / 2, x[0, 2]])
    torch.testing.assert_close(trees.values[0], expected)


def test_the_soft_threshold_keeps_the_budget_unmerged():
    # nearly equal frames, threshold 0.5: all 5 * (49 - 5) non-ADTS tokens of frames 1..5 would merge,
    # only F*(N - B) = 6 * 33 may
    x, scores = video(6, 49, 16, 5, noise=0.05)
    out = flashvid_visual(x, scores, 0.25, alpha=0.3, min_segments=1, temporal_threshold=0.5)
    assert out.budget == (16, 5, 11)
    budget, count, _ = out.budget
    assert sum(out.roots) + 6 * count >= 6 * budget  # unmerged (ADTS included) >= B*|G|
    assert sum(out.roots) + 6 * count <= 6 * budget + 1  # the (F*(N - B))-th largest m stays


# ---- edge cases ----------------------------------------------------------------------------------
def test_full_budget_of_distinct_picks_is_the_identity():
    x, scores = video(5, 49, 16, 6, [0, 0, 1, 1, 2])
    out = flashvid_compress(x, scores, retention=1.0, alpha=1.0, selection="attn_div")
    assert torch.equal(out.positions, torch.arange(5 * 49)) and torch.equal(out.tokens, x.flatten(0, 1))


def test_alpha_one_keeps_only_adts_tokens():
    x, scores = video(4, 49, 16, 7)
    out = flashvid_visual(x, scores, 0.25, alpha=1.0, selection="attn_div")
    assert out.budget == (16, 16, 0) and out.tokens.shape[0] == 4 * 16
    assert torch.equal(out.tokens, x[torch.arange(4)[:, None], out.selected].flatten(0, 1))


def test_bfloat16_input_decides_in_float32():
    x, scores = video(6, 49, 16, 8, TWO_SCENES)
    out = flashvid_visual(x.bfloat16(), scores, 0.3, min_segments=2)
    same = flashvid_visual(x.bfloat16().float(), scores, 0.3, min_segments=2)
    assert out.tokens.dtype == torch.bfloat16 and torch.equal(out.positions, same.positions)
    assert torch.equal(out.tokens, same.tokens.bfloat16())


def test_input_is_not_modified():
    x, scores = video(6, 49, 16, 9, noise=0.05)
    before = x.clone(), scores.clone()
    flashvid_visual(x, scores, 0.25, min_segments=1, temporal_threshold=0.5)
    assert torch.equal(x, before[0]) and torch.equal(scores, before[1])


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match=r"flashvid: expected features \(F, N, D\) and scores \(F, N\)"):
        flashvid_visual(torch.randn(2, 9, 4), torch.rand(2, 8))
    with pytest.raises(ValueError, match="flashvid.selection='attn'"):
        flashvid_visual(torch.randn(2, 9, 4), torch.rand(2, 9), selection="attn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_reference():
    for seed in range(6):
        x, scores = video(6, 49, 16, seed, TWO_SCENES)
        ref = reference_flashvid(x, scores, min_segments=2, noise_seed=1)
        if ref.margin > SAFE:
            out = flashvid_visual(x.cuda(), scores.cuda(), min_segments=2, generator=torch.Generator().manual_seed(1))
            assert out.tokens.is_cuda and out.positions.is_cuda
            assert_matches(VideoTokens(out.tokens.cpu(), out.positions.cpu()), ref)
            return
    pytest.fail("no input with safe margins")


# ---- knobs and the compressor --------------------------------------------------------------------
@pytest.mark.parametrize("knob,value,message", [
    ("retention", 0.0, r"flashvid.retention=0.0: expected a value in \(0.0, 1.0\]"),
    ("retention", float("nan"), "flashvid.retention=nan"),
    ("expansion", 0.0, r"flashvid.expansion=0.0: expected a value in \(0.0, inf\)"),
    ("alpha", 1.5, r"flashvid.alpha=1.5: expected a value in \[0.0, 1.0\]"),
    ("temporal_threshold", 1.2, r"flashvid.temporal_threshold=1.2: expected a value in \[-1.0, 1.0\]"),
    ("segment_threshold", -2, r"flashvid.segment_threshold=-2: expected a value in \[-1.0, 1.0\]"),
    ("min_segments", 0, r"flashvid.min_segments=0: expected an integer in \[1, inf\]"),
    ("selection", "attn", "flashvid.selection='attn': expected one of attn_div_v2, attn_div"),
    ("pruning_layer", 0, "flashvid.pruning_layer=0"),
    ("llm_keep", 0.0, r"flashvid.llm_keep=0.0: expected a value in \(0.0, 1.0\]"),
    ("positions", "kept", "flashvid.positions='kept': expected one of compact, original"),
])
def test_bad_knobs_are_rejected(knob, value, message):
    with pytest.raises(ValueError, match=message):
        methods.build("flashvid", **{knob: value})


def test_defaults_are_the_official_llava_onevision_ones():
    m = methods.build("flashvid")
    assert type(m) is FlashVID and m.stages == frozenset({"visual", "prefill"})
    assert m.needs == frozenset({"patch_scores"}) and m.retention_knob.direct
    assert m.knobs() == {"retention": 0.25, "expansion": 1.25, "alpha": 0.7, "temporal_threshold": 0.8,
                         "segment_threshold": 0.9, "min_segments": 8, "selection": "attn_div_v2",
                         "pruning_layer": None, "llm_keep": 0.3, "positions": "compact"}


def test_pruning_layer_scales_with_depth_and_keeps_the_identity():
    assert [FlashVID().prefill_policy(LLMShape(64, 128, d)).layers for d in (28, 24, 8)] == [(20,), (17,), (6,)]
    assert FlashVID(pruning_layer=3).prefill_policy(LLMShape(64, 128, 8)).layers == (3,)
    with pytest.raises(ValueError, match=r"flashvid.pruning_layer=8: expected a layer in \[1, 7\]"):
        FlashVID(pruning_layer=8).prefill_policy(LLMShape(64, 128, 8))
    # e * (K + (L - K) * rho) / L = 1 at 28 layers, and nearly so at 24 (K = 17)
    for depth, k in ((28, 20), (24, 17)):
        assert abs(1.25 * (k + (depth - k) * 0.3) / depth - 1) < 0.006


def test_rho_avg_is_the_retention_on_28_layers():
    shape = LLMShape(3584, 18944, 28)
    video_in = 32 * 196
    out = 32 * 62  # V' at r = 0.25: B = 62 per frame
    planned = FlashVID().prefill_policy(shape).planned(out)
    assert planned == [out] * 20 + [596] * 8
    rho = retention_numbers(video_in, 100, planned, shape)
    assert abs(rho["rho_avg"] - 0.25) < 0.005  # the ceilings add a little
    assert rho["rho_visual"] == out / video_in and rho["rho_tok"] == 596 / video_in


def test_compress_returns_compact_or_original_positions():
    x, _ = video(4, 196, 16, 10)
    scores = torch.rand(4, 729, generator=torch.Generator().manual_seed(0))
    visual = VisualInput(x, (14, 14), patch_scores=scores)
    compact = methods.build("flashvid", min_segments=2).compress(visual)
    original = methods.build("flashvid", min_segments=2, positions="original").compress(visual)
    ref = flashvid_compress(x, pooled_scores(scores, (14, 14)), min_segments=2,
                            generator=torch.Generator().manual_seed(0))
    assert isinstance(compact, torch.Tensor) and isinstance(original, VideoTokens)
    assert torch.equal(compact, ref.tokens) and torch.equal(original.tokens, ref.tokens)
    assert torch.equal(original.positions, ref.positions)
    with pytest.raises(ValueError, match="patch_scores"):
        methods.build("flashvid").compress(VisualInput(x, (14, 14)))


def test_config_sets_retention_directly(cfg_factory):
    from tests.helpers import choice_of

    choice = choice_of(cfg_factory("+method=flashvid", "retention=0.1"))
    assert choice.target_retention is None and choice.knobs["retention"] == 0.1 and choice.label == "r=0.1"
    qwen = choice_of(cfg_factory("+method=flashvid", "method.selection=attn_div", "method.min_segments=4",
                                 "method.positions=original"))
    assert (qwen.knobs["selection"], qwen.knobs["min_segments"], qwen.knobs["positions"]) == (
        "attn_div", 4, "original")


# ---- the prefill stage on the tiny LLaVA-OneVision ----------------------------------------------------
@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    from harness.models.llava_onevision import LlavaOneVision

    return LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")


@pytest.fixture(scope="module")
def pixels(smoke_questions, tiny_llava):
    from harness.data.video import preprocess, read_frames

    p = tiny_llava.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", FRAMES),
                      p.size, p.mean, p.std)


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None]


def stock_logits(adapter, embeds, positions, layers):
    """The stock Qwen2 forward on `embeds` at `positions` over a slice of its layers, + the head."""
    lm = adapter.model.model.language_model
    full, depth = lm.layers, lm.config.num_hidden_layers
    lm.layers = torch.nn.ModuleList(list(full)[layers])
    lm.config.num_hidden_layers = len(lm.layers)
    try:
        with torch.no_grad():
            hidden = lm(inputs_embeds=embeds, position_ids=positions, attention_mask=causal(embeds.shape[1]),
                        use_cache=False).last_hidden_state
    finally:
        lm.layers, lm.config.num_hidden_layers = full, depth
    return adapter.model.lm_head(hidden)


def stock_pruned(adapter, eager, embeds, span, layer, keep):
    """The official fastv_prune by hand on the stock model: the eager attention row of the last
    token at layer-1 (mean over heads), the ceil(keep*V') highest video tokens, the states entering
    `layer` from a full forward. Returns (kept prompt indices, states, the cut's margin)."""
    start, end = span
    lm = adapter.model.model.language_model
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
        row = eager.model(inputs_embeds=embeds, output_attentions=True).attentions[layer - 1][0, :, -1].mean(0)
    video = row[start:end].double()
    count = math.ceil((end - start) * keep)
    ranked = sorted(range(end - start), key=lambda i: (-float(video[i]), i))
    margin = float(video[ranked[count - 1]] - video[ranked[count]]) if count < end - start else math.inf
    kept = torch.cat([torch.arange(start), torch.tensor(sorted(ranked[:count])) + start,
                      torch.arange(end, embeds.shape[1])])
    return kept, hidden[:, kept], margin


def test_prefill_equals_the_stock_model_pruned_by_hand(tiny_llava, eager, pixels):
    method = FlashVID(retention=0.5)
    ids, _ = tiny_llava.prompt_ids(QUESTION)
    prompt = tiny_llava.prepare(pixels, method, ids)
    out = tiny_llava.prefill(prompt, method, use_cache=True)
    K = 6  # round(20 * 8 / 28)
    kept, states, margin = stock_pruned(tiny_llava, eager, prompt.embeds, prompt.span, K, 0.3)
    # the eager row and the driver's recomputed row differ by ~1e-9; the cut must be wider
    assert margin > 1e-8
    assert out.kept.tolist() == kept.tolist()
    # compact positions (official LLaVA-OV): prompt index = position; kept tokens keep theirs
    assert torch.equal(prompt.positions[0], torch.arange(prompt.embeds.shape[1]))
    expected = stock_logits(tiny_llava, states, kept[None], slice(K, None))
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, prompt.embeds.shape[1], depth=LAYERS))
    video = prompt.span[1] - prompt.span[0]
    pruned = math.ceil(video * 0.3)
    assert prompt.run.layer_video_tokens == [video] * K + [pruned] * (LAYERS - K)
    assert prompt.run.layer_video_tokens == method.prefill_policy(tiny_llava.llm.shape).planned(video)
    assert prompt.run.video_tokens_out == pruned  # what rho_tok counts
    assert [layer.keys.shape[-2] for layer in out.state.cache.layers] == (
        [prompt.embeds.shape[1]] * K + [len(kept)] * (LAYERS - K))


def test_cached_decode_equals_an_uncached_reference(tiny_llava, eager, pixels):
    """Each decode step equals the stock model run without cache on prompt + generated tokens: layers
    < K over everything, layers >= K over the kept prompt tokens and the generated ones, all at their
    original positions."""
    K = 4
    method = FlashVID(retention=0.5, pruning_layer=K, positions="original")
    ids, _ = tiny_llava.prompt_ids(QUESTION)
    prompt = tiny_llava.prepare(pixels, method, ids)
    start, end = prompt.span
    # original positions: each kept video token at its index in the F*N input, the text after the
    # video where it would be without compression
    visual = tiny_llava.compress(pixels, method).tokens
    assert torch.equal(prompt.positions[0, start:end], start + visual.positions)
    assert int(prompt.positions[0, -1]) == len(ids) - 1 + FRAMES * 196  # + the newline - 1
    out = tiny_llava.prefill(prompt, method, use_cache=True)
    embeds, total, positions = prompt.embeds, prompt.embeds.shape[1], prompt.positions
    lm = tiny_llava.model.model.language_model
    with torch.no_grad():
        row = eager.model(inputs_embeds=embeds, position_ids=positions,
                          output_attentions=True).attentions[K - 1][0, :, -1].mean(0)
    count = math.ceil((end - start) * 0.3)
    top = torch.sort(-row[start:end].double(), stable=True).indices[:count].sort().values + start
    kept = torch.cat([torch.arange(start), top, torch.arange(end, total)])
    assert out.kept.tolist() == kept.tolist()
    embed = tiny_llava.model.get_input_embeddings()
    logits = out.logits[0, -1]
    for step in range(4):
        token = int(logits.argmax())
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
        step_position = positions[:, -1:] + 1
        positions = torch.cat([positions, step_position], 1)
        with torch.no_grad():
            logits = decoder.decode(tiny_llava.llm, out.state, torch.tensor([[token]]))[0, -1]
            hidden = lm(inputs_embeds=embeds, position_ids=positions, output_hidden_states=True).hidden_states[K]
        generated = torch.arange(total, total + step + 1)
        index = torch.cat([kept, generated])
        expected = stock_logits(tiny_llava, hidden[:, index], positions[:, index], slice(K, None))[0, -1]
        torch.testing.assert_close(logits, expected, **close(torch.float32, total, depth=LAYERS))
    assert [layer.keys.shape[-2] for layer in out.state.cache.layers] == (
        [total + 4] * K + [len(kept) + 4] * (LAYERS - K))


def test_keeping_every_token_reproduces_none(tiny_llava, pixels):
    """retention 1 with alpha 1 and distinct picks (v1) keeps every token in order, and llm_keep 1
    every token in the LLM: the same kernels on the same inputs, so exactly none's logits."""
    method = FlashVID(retention=1.0, alpha=1.0, selection="attn_div", llm_keep=1.0)
    ids, _ = tiny_llava.prompt_ids(QUESTION)
    ours, ref = tiny_llava.prepare(pixels, method, ids), tiny_llava.prepare(pixels, methods.build("none"), ids)
    assert torch.equal(ours.embeds, ref.embeds) and torch.equal(ours.positions, ref.positions)
    a = tiny_llava.prefill(ours, method, use_cache=False).logits
    b = tiny_llava.prefill(ref, methods.build("none"), use_cache=False).logits
    assert torch.equal(a, b)
    assert ours.run.layer_video_tokens == [FRAMES * 196] * LAYERS


# ---- Qwen2.5-VL ------------------------------------------------------------------------------------------
def test_official_qwen_setting_keeps_mrope_positions_and_prunes(qwen, smoke_questions):
    """selection=attn_div, min_segments=4, positions=original (scripts/qwen2_5_vl.sh): the visual
    stage's tokens keep their (t, h, w) ids, scores are each merge unit's four patches averaged,
    and the LLM keeps ceil(0.3*V') of them from layer 6 on, each at its original ids."""
    clip = qwen.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), 8)
    method = methods.build("flashvid", selection="attn_div", min_segments=4, positions="original")
    ids, _ = qwen.prompt_ids(QUESTION)
    encoded = qwen.encode_video(clip, method.needs)
    visual = encoded.visual
    gh, gw = visual.patch_grid
    units = visual.patch_scores.view(-1, gh // 2, 2, gw // 2, 2).mean((2, 4)).flatten(1)
    torch.testing.assert_close(pooled_scores(visual.patch_scores, visual.grid, visual.patch_grid), units)
    tokens = method.compress(visual)
    ref = flashvid_compress(visual.features, units, selection="attn_div", min_segments=4,
                            generator=torch.Generator().manual_seed(0))
    assert isinstance(tokens, VideoTokens) and torch.equal(tokens.positions, ref.positions)
    prompt = qwen.prepare(encoded, method, ids)
    start, end = prompt.span
    full = qwen.video_positions(start, visual.features.shape[0], visual.grid, encoded.extras["time_interval"])
    assert torch.equal(prompt.positions[:, 0, start:end], full[:, tokens.positions])
    out = qwen.prefill(prompt, method, use_cache=True)
    video = end - start
    assert prompt.run.layer_video_tokens == [video] * 6 + [math.ceil(0.3 * video)] * 2
    total = prompt.embeds.shape[1]
    assert len(out.state.layer_origin[-1]) == total - video + math.ceil(0.3 * video)
    # decoding continues after the largest original position, whatever was pruned
    assert out.state.next_position.flatten().tolist() == [int(prompt.positions.amax()) + 1] * 3
    _, run = qwen.generate(clip, QUESTION, method, max_new_tokens=3)
    assert run.layer_video_tokens == prompt.run.layer_video_tokens


# ---- a harness run ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_harness_run(cfg_factory):
    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=flashvid", "retention=0.25"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "flashvid" and summary["label"] == "r=0.25" and summary["n_failed"] == 0
    rho = {k: v["mean"] for k, v in summary["retention"].items() if v}
    # tiny model, 8 frames of 196: V' in [8*62, 8*62 + 8), ceil(0.3*V') from layer 6 of 8 on
    assert 62 / 196 <= rho["rho_visual"] < (62 + 1) / 196
    assert rho["rho_tok"] == pytest.approx(math.ceil(0.3 * rho["rho_visual"] * 1568) / 1568, abs=1e-3)
    assert rho["rho_avg"] == pytest.approx((6 * rho["rho_visual"] + 2 * rho["rho_tok"]) / 8, abs=1e-6)
