"""methods/vidcom2.py against the method as its docstring states it and its literal restatement.

The literal reference (tests/reference/vidcom2.py) is plain Python in double precision. float64
input makes the implementation decide in float64 too: the same decisions unless one lies within
~1e-13; float32 comparisons use inputs whose decisions are at least SAFE away from flipping.
"""

from __future__ import annotations

import json

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core.base import VisualInput
from methods.vidcom2 import (
    VidCom2,
    frame_budgets,
    gaussian_scores,
    vidcom2_compress,
    vidcom2_keep,
)
from tests.reference.vidcom2 import official_style_vidcom2, reference_vidcom2

SAFE = 1e-5
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def video(frames: int, per_frame: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Frames with their own mean and spread (so frame budgets differ), channels of varied scale."""
    g = torch.Generator().manual_seed(seed)
    channel_scale = 0.2 + 2 * torch.rand(dim, generator=g, dtype=torch.float64)
    shared = torch.randn(dim, generator=g, dtype=torch.float64)
    frame_mean = shared + 0.6 * torch.randn(frames, 1, dim, generator=g, dtype=torch.float64)
    spread = 0.3 + torch.rand(frames, 1, 1, generator=g, dtype=torch.float64)
    x = frame_mean + spread * torch.randn(frames, per_frame, dim, generator=g, dtype=torch.float64)
    return (x * channel_scale).to(dtype)


def kept_mask(ref, frames: int, per_frame: int) -> torch.Tensor:
    mask = torch.zeros(frames, per_frame, dtype=torch.bool)
    for f, idx in enumerate(ref.keep):
        mask[f, idx] = True
    return mask


# ----------------------------------------------------------------------------------------------
# Equality with the literal reference

# The retentions avoid exact halves: with a saturated softmax (p one-hot) s_f * N is r(2 - 1/F)N
# or r(1 - 1/F)N, an exact half for e.g. r = 0.25, F = 2, N = 196 (73.5) or r = 0.3, F = 3, N = 49,
# which round-off in the last bit may send either way.
SHAPES = [(1, 196, 16), (2, 196, 32), (3, 49, 24), (5, 16, 8), (4, 196, 12), (7, 25, 10)]


@pytest.mark.parametrize("frames,per_frame,dim", SHAPES)
@pytest.mark.parametrize("retention", [0.1, 0.33, 0.6])
def test_matches_literal_float64(frames, per_frame, dim, retention):
    x = video(frames, per_frame, dim, seed=frames * 1000 + per_frame + dim, dtype=torch.float64)
    ref = reference_vidcom2(x, retention)
    assert ref.margin > 1e-12, "input too close to a tie for float64"
    keep = vidcom2_keep(x, retention)
    assert torch.equal(keep, kept_mask(ref, frames, per_frame))
    y = vidcom2_compress(x, retention)
    assert torch.equal(y, ref.output)  # rows of the input, unchanged


@pytest.mark.parametrize("frames,per_frame,dim", SHAPES)
def test_matches_literal_float32(frames, per_frame, dim):
    checked = 0
    for seed in range(20):
        retention = (0.1, 0.33, 0.6)[seed % 3]
        x = video(frames, per_frame, dim, seed=seed)
        ref = reference_vidcom2(x, retention)
        if ref.margin < SAFE:
            continue  # a decision float32 round-off may legitimately flip
        y = vidcom2_compress(x, retention)
        assert y.dtype == torch.float32 and torch.equal(y, ref.output)
        checked += 1
        if checked == 2:
            return
    pytest.fail(f"only {checked} inputs with safe margins")


@pytest.mark.parametrize("block", [1, 200, 2 * 49 * 24])
def test_blocked_passes_match_literal(monkeypatch, block):
    """Passes over X in blocks (as on CPU at full size): several blocks, a partial last one."""
    import methods.vidcom2 as module

    monkeypatch.setattr(module, "BLOCK", block)
    for dtype in (torch.float64, torch.float32):
        x = video(5, 49, 24, seed=21, dtype=dtype)
        ref = reference_vidcom2(x, 0.33)
        assert ref.margin > SAFE
        assert torch.equal(vidcom2_compress(x, 0.33), ref.output)


def test_budgets_differ_between_frames_and_follow_the_softmax():
    """The test inputs exercise step 4: frames unlike the video get more tokens."""
    x = video(6, 196, 32, seed=3, dtype=torch.float64)
    ref = reference_vidcom2(x, 0.25)
    assert len(set(ref.budgets)) > 1
    v, _ = gaussian_scores(x)
    budgets = frame_budgets(v, 0.25)
    assert budgets.tolist() == ref.budgets
    # the most unique frame (lowest mean v) gets the most tokens
    assert int(budgets.argmax()) == int(v.mean(1).argmin())


def test_official_style_comparator_agrees():
    """The benchmark's stand-in for the official file computes the same output."""
    x = video(4, 196, 64, seed=5)
    for retention in (0.1, 0.25):
        assert torch.equal(official_style_vidcom2(x, retention), vidcom2_compress(x, retention))


# ----------------------------------------------------------------------------------------------
# Counts and edge cases


@pytest.mark.parametrize("frames", [1, 3, 8])
@pytest.mark.parametrize("retention", [0.05, 0.25, 0.5, 0.9, 1.0])
def test_token_count_is_the_sum_of_the_frame_budgets(frames, retention):
    x = video(frames, 196, 16, seed=frames)
    v, _ = gaussian_scores(x)
    u = -v.double().mean(1)
    p = torch.softmax((u - u.max()) / 0.01, dim=0)
    expected = [max(1, round(min(1.0, retention * (1 + float(pf) - 1 / frames)) * 196)) for pf in p]
    keep = vidcom2_keep(x, retention)
    assert keep.sum(1).tolist() == expected
    assert vidcom2_compress(x, retention).shape == (sum(expected), 16)


def test_single_frame_keeps_round_r_n():
    # one frame: p = 1 = mean(p), so s = r exactly
    x = video(1, 196, 16, seed=11)
    for retention, k in [(0.25, 49), (0.1, 20), (0.125, 24), (0.001, 1), (1.0, 196)]:
        assert vidcom2_keep(x, retention).sum() == k  # 24.5 rounds half to even


def test_full_retention_of_one_frame_is_the_identity():
    x = video(1, 196, 16, seed=12)
    assert torch.equal(vidcom2_compress(x, 1.0), x[0])


def test_full_retention_drops_tokens_of_typical_frames():
    # s_f = min(1, 1 + p_f - 1/F): frames with p_f < 1/F keep fewer than all tokens
    x = video(4, 196, 16, seed=13)
    counts = vidcom2_keep(x, 1.0).sum(1)
    assert (counts == 196).sum() >= 1 and (counts < 196).sum() >= 1


def test_identical_tokens_keep_the_first_of_each_frame():
    x = torch.randn(16).expand(3, 196, 16).clone()
    keep = vidcom2_keep(x, 0.25)
    assert keep.sum(1).tolist() == [49] * 3  # all frames alike: p uniform, s = r
    assert keep[:, :49].all() and not keep[:, 49:].any()  # score ties: lower index first
    assert torch.equal(vidcom2_compress(x, 1.0), x.flatten(0, 1))


def test_output_is_frame_major_in_original_order():
    x = video(5, 196, 16, seed=14)
    # a tag channel of the largest variance: not among the int(17/2) = 8 scoring channels, which
    # stay x's own 8 lowest-variance channels, so the selection is x's
    tag = torch.arange(5 * 196, dtype=torch.float32).view(5, 196, 1)
    y = vidcom2_compress(torch.cat([x, tag], dim=-1), 0.3)
    assert bool((y[:, -1].diff() > 0).all())
    assert torch.equal(y[:, :-1], vidcom2_compress(x, 0.3))
    assert torch.equal(y[:, :-1], x.flatten(0, 1)[y[:, -1].long()])


def test_bfloat16_input_decides_in_float32():
    x = video(4, 49, 32, seed=15).bfloat16()
    y = vidcom2_compress(x, 0.25)
    assert y.dtype == torch.bfloat16
    keep = vidcom2_keep(x.float(), 0.25)
    assert torch.equal(y, x.flatten(0, 1)[keep.flatten()])


def test_input_is_not_modified():
    x = video(3, 49, 16, seed=16)
    before = x.clone()
    vidcom2_compress(x, 0.25)
    assert torch.equal(x, before)


def test_lowest_variance_channels_are_the_scoring_channels():
    # channels 0..7 vary a lot, 8..15 little: only 8..15 may influence the scores
    x = video(3, 49, 16, seed=17)
    x[..., :8] *= 100
    y = x.clone()
    y[..., :8] = torch.randn(3, 49, 8, generator=torch.Generator().manual_seed(1)) * 1000
    assert torch.equal(vidcom2_keep(x, 0.3), vidcom2_keep(y, 0.3))
    z = x.clone()
    z[..., 8:] = z[..., 8:].flip(1)  # reorder the tokens' scoring channels: different selection
    assert not torch.equal(vidcom2_keep(x, 0.3), vidcom2_keep(z, 0.3))


# ----------------------------------------------------------------------------------------------
# Knobs


@pytest.mark.parametrize("retention, message", [
    (0, r"vidcom2.retention=0: expected a value in \(0.0, 1.0\]"), (-0.1, "vidcom2.retention=-0.1"),
    (1.5, "vidcom2.retention=1.5"), (True, "vidcom2.retention=True: expected a number"),
    ("0.25", "vidcom2.retention='0.25': expected a number"), (float("nan"), "vidcom2.retention=nan"),
])
def test_rejects_bad_retention(retention, message):
    with pytest.raises(ValueError, match=message):
        VidCom2(retention=retention)
    with pytest.raises(ValueError, match=message):
        vidcom2_compress(torch.randn(2, 4, 8), retention)


@pytest.mark.parametrize("shape", [(4, 8), (0, 4, 8), (2, 0, 8), (1, 2, 4, 8)])
def test_rejects_bad_features(shape):
    with pytest.raises(ValueError, match="features"):
        vidcom2_compress(torch.randn(shape), 0.25)
    with pytest.raises(TypeError, match="features"):
        vidcom2_compress(torch.ones(2, 4, 8, dtype=torch.long), 0.25)


def test_registered_with_a_direct_retention_knob():
    method = methods.build("vidcom2", retention=0.3)
    assert isinstance(method, VidCom2) and method.stages == {"visual"}
    assert method.retention_knob.knob == "retention" and method.retention_knob.direct
    x = video(3, 196, 16, seed=18)
    assert torch.equal(method.compress(VisualInput(x, (14, 14))), vidcom2_compress(x, 0.3))
    with pytest.raises(ValueError, match="no knob scope"):
        methods.build("vidcom2", scope="frame")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    for seed in range(30, 50):
        x = video(8, 196, 64, seed=seed)
        ref = reference_vidcom2(x, 0.33)
        if ref.margin > SAFE:
            y = vidcom2_compress(x.cuda(), 0.33)
            assert y.is_cuda and torch.equal(y.cpu(), ref.output)
            return
    pytest.fail("no input with safe margins")


# ----------------------------------------------------------------------------------------------
# Through the model


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


def clip(adapter, smoke_questions, frames: int) -> torch.Tensor:
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", frames),
                      p.size, p.mean, p.std)


def test_the_llm_sees_the_kept_features_at_consecutive_positions(adapter, smoke_questions):
    pixels = clip(adapter, smoke_questions, 4)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, VidCom2(retention=0.25), ids)
    encoded = adapter.encode(pixels)
    visual, newline = encoded.visual, encoded.extras["newline"]
    keep = vidcom2_keep(visual.features, 0.25)
    start, end = prompt.span
    assert end - start == int(keep.sum()) == prompt.run.video_tokens_out
    assert prompt.run.video_tokens_in == 4 * 196
    # the kept features and the newline, copied from the same encoder output: exact
    assert torch.equal(prompt.embeds[0, start:end], visual.features.flatten(0, 1)[keep.flatten()])
    assert torch.equal(prompt.embeds[0, end], newline.reshape(-1).to(prompt.embeds.dtype))  # newline kept
    assert torch.equal(prompt.positions[0], torch.arange(prompt.embeds.shape[1]))  # renumbered


def test_full_retention_on_one_frame_reproduces_none_s_logits(adapter, smoke_questions):
    pixels = clip(adapter, smoke_questions, 1)
    ids, _ = adapter.prompt_ids(QUESTION)
    logits = []
    for method in (VidCom2(retention=1.0), methods.build("none")):
        prompt = adapter.prepare(pixels, method, ids)
        with torch.no_grad():
            logits.append(adapter.prefill(prompt, method, use_cache=False).logits)
    # full retention hands the LLM `none`'s tokens: the same kernels on the same inputs: exact
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


@pytest.mark.slow
def test_runs_in_the_harness(cfg_factory):
    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=vidcom2", "retention=0.25", "task.limit=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "vidcom2" and summary["knobs"] == {"retention": 0.25}
    assert 0.2 < summary["retention"]["rho_tok"]["mean"] < 0.3
