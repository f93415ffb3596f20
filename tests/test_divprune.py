"""methods/divprune.py against the method as its docstring states it and its literal restatement.

The literal reference (tests/reference/divprune.py) recomputes every candidate's minimum distance to
the selected set at every step in plain Python, in float64. float64 input makes the implementation
decide in float64 as well; float32 comparisons use inputs whose per-step best and second-best
scores are at least SAFE apart.
"""

from __future__ import annotations

import json

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core.base import VisualInput
from methods.divprune import (
    DivPrune,
    divprune_budget,
    divprune_compress,
    divprune_select,
)
from tests.reference.divprune import (
    official_style_select,
    reference_divprune,
    reference_select,
)

SAFE = 1e-5
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def tokens(frames: int, per_frame: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Tokens around a few shared directions with random norms (near and far pairs both occur)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, per_frame // 6), dim, generator=g, dtype=torch.float64)
    pick = torch.randint(0, centres.shape[0], (frames, per_frame), generator=g)
    noise = 0.7 * torch.randn(frames, per_frame, dim, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(frames, per_frame, 1, generator=g, dtype=torch.float64)
    return ((centres[pick] + noise) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------
# Equality with the literal reference

VIDEO_CASES = [(1, 49, 16, 0.25), (3, 49, 16, 0.1), (2, 25, 8, 0.5), (5, 16, 8, 0.3), (1, 1, 4, 1.0),
               (3, 16, 8, 1.0), (1, 196, 32, 0.05), (7, 9, 6, 0.6)]
FRAME_CASES = [(1, 196, 16, 0.25), (3, 196, 16, 0.1), (4, 49, 8, 0.5), (5, 16, 8, 1.0), (2, 1, 4, 0.5)]


@pytest.mark.parametrize("frames,per_frame,dim,retention", VIDEO_CASES)
def test_video_scope_matches_literal_float64(frames, per_frame, dim, retention):
    x = tokens(frames, per_frame, dim, seed=frames * 100 + per_frame + dim, dtype=torch.float64)
    n = frames * per_frame
    ref = reference_select(x.reshape(n, dim), divprune_budget(retention, n))
    assert ref.gap > 1e-12, "input too close to a tie for float64"
    picks = divprune_select(x.reshape(1, n, dim), len(ref.picks))
    assert picks[0].tolist() == ref.picks  # the same picks in the same order
    y = divprune_compress(x, retention, "video")
    assert torch.equal(y, reference_divprune(x, retention, "video").output)


@pytest.mark.parametrize("frames,per_frame,dim,retention", FRAME_CASES)
def test_frame_scope_matches_literal_float64(frames, per_frame, dim, retention):
    x = tokens(frames, per_frame, dim, seed=frames * 100 + per_frame + dim + 1, dtype=torch.float64)
    ref = reference_divprune(x, retention, "frame")
    assert ref.gap > 1e-12, "input too close to a tie for float64"
    assert torch.equal(divprune_compress(x, retention, "frame"), ref.output)
    k = divprune_budget(retention, per_frame)
    picks = divprune_select(x, k)
    for f in range(frames):
        assert picks[f].tolist() == reference_select(x[f], k).picks


@pytest.mark.parametrize("scope,frames,per_frame,dim", [
    ("video", 1, 196, 32), ("video", 3, 49, 16), ("video", 2, 196, 24),
    ("frame", 1, 196, 32), ("frame", 3, 49, 16), ("frame", 4, 196, 24)])
def test_matches_literal_float32(scope, frames, per_frame, dim):
    checked = 0
    for seed in range(12):
        retention = (0.1, 0.25, 0.4)[seed % 3]
        x = tokens(frames, per_frame, dim, seed=seed)
        ref = reference_divprune(x, retention, scope)
        if ref.gap < SAFE:
            continue  # a step whose best and second-best score float32 may swap
        y = divprune_compress(x, retention, scope)
        assert y.dtype == torch.float32 and torch.equal(y, ref.output)
        checked += 1
        if checked == 2:
            return
    pytest.fail(f"only {checked} inputs with safe margins")


def test_greedy_max_min_on_a_circle():
    # unit vectors at 0, 10, 40, 90 and 200 degrees; nearest-neighbour angles 10, 10, 30, 50, 110:
    # first 200; then the farthest from it, 10 (170 deg); then 90 (80 deg from 10), then 40 (30
    # deg from 10), then 0
    angles = torch.tensor([0.0, 10.0, 40.0, 90.0, 200.0], dtype=torch.float64).deg2rad()
    x = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [2], [0.5], [3], [1]])
    assert divprune_select(x[None], 5)[0].tolist() == [4, 1, 3, 2, 0] == reference_select(x, 5).picks
    assert divprune_select(x[None].float(), 3)[0].tolist() == [4, 1, 3]
    assert torch.equal(divprune_compress(x[None], 0.6), x[[1, 3, 4]])


@pytest.mark.slow
def test_running_minimum_equals_the_official_re_minimum_on_ordinary_input():
    """The official structure (unmasked, re-minimum over all selected rows) picks the same tokens.

    (On an input whose most isolated tokens are a mutually nearest pair, the last bit of the
    product may decide the official first pick; not so on this one.)"""
    x = tokens(2, 196, 32, seed=21)
    n = 2 * 196
    for k in (1, 39, 98, 200):
        assert torch.equal(divprune_select(x.reshape(1, n, 32), k)[0], official_style_select(x.reshape(n, 32), k))


# ----------------------------------------------------------------------------------------------
# Counts and edge cases


@pytest.mark.parametrize("frames", [1, 3, 8])
@pytest.mark.parametrize("retention", [0.001, 0.1, 0.125, 0.25, 0.9, 1.0])
def test_exact_token_counts(frames, retention):
    x = tokens(frames, 196, 8, seed=frames)
    assert divprune_compress(x, retention, "video").shape[0] == max(1, round(retention * frames * 196))
    assert divprune_compress(x, retention, "frame").shape[0] == frames * max(1, round(retention * 196))
    assert divprune_budget(0.125, 196) == 24 and divprune_budget(0.375, 196) == 74  # half to even


@pytest.mark.parametrize("scope", ["video", "frame"])
def test_full_retention_is_the_identity(scope):
    x = tokens(3, 49, 16, seed=4)
    assert torch.equal(divprune_compress(x, 1.0, scope), x.flatten(0, 1))


def test_exact_duplicates_are_not_picked_twice():
    # axis-aligned tokens: unit rows and cosines are exact, so distances are exactly 0 or 1
    axes = torch.eye(3)
    x = torch.stack([axes[0], 2 * axes[1], axes[0], 3 * axes[2], axes[1], 5 * axes[0]])[None]
    picks = divprune_select(x, 6)[0].tolist()
    assert sorted(picks) == list(range(6))  # every token once
    # 3 (e2) is the only token without a duplicate; then 0 (e0), then 1 (e1), then the duplicates
    assert picks == [3, 0, 1, 2, 4, 5] == reference_select(x[0], 6).picks
    # the official structure re-picks a selected token once the distinct directions are used up
    official = official_style_select(x[0], 6).tolist()
    assert official[:3] == [3, 0, 1] and len(set(official)) < 6


def test_identical_tokens_keep_the_first_ones():
    x = (2 * torch.eye(8)[3]).expand(2, 49, 8).clone()
    assert divprune_select(x.reshape(1, 98, 8), 10)[0].tolist() == list(range(10))
    y = divprune_compress(x, 0.25, "frame")
    assert y.shape == (2 * 12, 8) and torch.equal(y, x[:, :12].flatten(0, 1))


def test_zero_tokens_are_at_distance_one_from_everything():
    x = tokens(1, 49, 8, seed=6, dtype=torch.float64)
    x[0, [5, 30]] = 0
    ref = reference_divprune(x, 0.2)
    y = divprune_compress(x, 0.2)
    assert not torch.isnan(y).any() and torch.equal(y, ref.output)


def test_output_is_in_original_order():
    x = tokens(4, 196, 8, seed=7)
    tag = torch.arange(4 * 196, dtype=torch.float32).view(4, 196, 1) * 1e-30  # changes no cosine
    for scope in ("video", "frame"):
        y = divprune_compress(torch.cat([x, tag], dim=-1), 0.2, scope)
        order = (y[:, -1] / 1e-30).round().long()
        assert bool((order.diff() > 0).all())
        assert torch.equal(y[:, :-1], x.flatten(0, 1)[order])
    per_frame = (divprune_compress(torch.cat([x, tag], dim=-1), 0.2, "frame")[:, -1] / 1e-30).round()
    assert (per_frame.long() // 196).tolist() == sorted([f for f in range(4) for _ in range(39)])


def test_bfloat16_input_decides_in_float32():
    x = tokens(2, 49, 16, seed=8).bfloat16()
    y = divprune_compress(x, 0.3)
    assert y.dtype == torch.bfloat16
    keep = divprune_select(x.float().reshape(1, 98, 16), round(0.3 * 98))[0].sort().values
    assert torch.equal(y, x.flatten(0, 1)[keep])


def test_input_is_not_modified():
    x = tokens(2, 49, 16, seed=9)
    before = x.clone()
    divprune_compress(x, 0.25)
    divprune_compress(x, 0.25, "frame")
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------------------------
# Knobs


@pytest.mark.parametrize("knobs, message", [
    ({"retention": 0}, r"divprune.retention=0: expected a value in \(0.0, 1.0\]"),
    ({"retention": 1.01}, "divprune.retention=1.01"),
    ({"retention": "0.25"}, "divprune.retention='0.25': expected a number"),
    ({"retention": float("nan")}, "divprune.retention=nan"),
    ({"scope": "clip"}, "divprune.scope='clip': expected one of video, frame"),
    ({"scope": None}, "divprune.scope=None: expected one of video, frame"),
])
def test_rejects_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=message):
        DivPrune(**knobs)
    with pytest.raises(ValueError, match=message):
        divprune_compress(torch.randn(2, 4, 8), **{"retention": 0.5, **knobs})


@pytest.mark.parametrize("shape", [(4, 8), (0, 4, 8), (2, 0, 8), (1, 2, 4, 8)])
def test_rejects_bad_features(shape):
    with pytest.raises(ValueError, match="features"):
        divprune_compress(torch.randn(shape), 0.25)
    with pytest.raises(TypeError, match="features"):
        divprune_compress(torch.ones(2, 4, 8, dtype=torch.long), 0.25)


def test_registered_with_a_direct_retention_knob():
    method = methods.build("divprune", retention=0.3, scope="frame")
    assert isinstance(method, DivPrune) and method.stages == {"visual"}
    assert method.retention_knob.knob == "retention" and method.retention_knob.direct
    x = tokens(3, 196, 16, seed=10)
    assert torch.equal(method.compress(VisualInput(x, (14, 14))), divprune_compress(x, 0.3, "frame"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    for seed in range(30, 50):
        x = tokens(4, 196, 64, seed=seed)
        ref = reference_divprune(x, 0.25, "video")
        if ref.gap > SAFE:
            assert torch.equal(divprune_compress(x.cuda(), 0.25).cpu(), ref.output)
            assert torch.equal(divprune_compress(x.cuda(), 0.25, "frame").cpu(),
                               reference_divprune(x, 0.25, "frame").output)
            return
    pytest.fail("no input with safe margins")


# ----------------------------------------------------------------------------------------------
# Through the model


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(adapter, smoke_questions):
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", 4),
                      p.size, p.mean, p.std)


@pytest.mark.parametrize("scope", ["video", "frame"])
@pytest.mark.slow
def test_the_llm_sees_the_kept_features_at_consecutive_positions(adapter, pixels, scope):
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, DivPrune(retention=0.25, scope=scope), ids)
    encoded = adapter.encode(pixels)
    visual, newline = encoded.visual, encoded.extras["newline"]
    expected = reference_divprune(visual.features, 0.25, scope, dtype=torch.float32).output
    start, end = prompt.span
    assert end - start == prompt.run.video_tokens_out == 4 * 49
    # the kept features and the newline, copied from the same encoder output: exact
    assert torch.equal(prompt.embeds[0, start:end], expected)
    assert torch.equal(prompt.embeds[0, end], newline.reshape(-1).to(prompt.embeds.dtype))
    assert torch.equal(prompt.positions[0], torch.arange(prompt.embeds.shape[1]))


@pytest.mark.parametrize("scope", ["video", "frame"])
def test_full_retention_reproduces_none_s_logits(adapter, pixels, scope):
    ids, _ = adapter.prompt_ids(QUESTION)
    logits = []
    for method in (DivPrune(retention=1.0, scope=scope), methods.build("none")):
        prompt = adapter.prepare(pixels, method, ids)
        with torch.no_grad():
            logits.append(adapter.prefill(prompt, method, use_cache=False).logits)
    # full retention hands the LLM `none`'s tokens: the same kernels on the same inputs: exact
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


@pytest.mark.slow
def test_runs_in_the_harness(cfg_factory):
    from tests.helpers import run_config

    scope = "frame"  # the knob reaches the method through the config (video: the default)
    cfg = cfg_factory("+method=divprune", "retention=0.25", f"method.scope={scope}", "task.limit=2")
    summary = json.loads((run_config(cfg) / "summary.json").read_text())
    assert summary["method"] == "divprune" and summary["knobs"] == {"retention": 0.25, "scope": scope}
    assert summary["retention"]["rho_tok"]["mean"] == pytest.approx(0.25)
