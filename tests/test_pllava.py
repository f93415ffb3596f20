"""PLLaVA pooling (methods/pllava.py) against its literal restatement and adaptive_avg_pool3d.

tests/reference/pllava.py averages every adaptive window with Python loops in float64; the method
pools separably with LLaVA's 2-D kernel and then over time, so the two agree up to round-off.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as nnf

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core.base import VisualInput
from methods.pllava import pllava_pool, pooling_shape
from tests.helpers.tolerance import close
from tests.reference.pllava import (
    reference_grid,
    reference_pllava,
    reference_shape,
    reference_windows,
)

QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def tokens(frames: int, n: int = 196, dim: int = 12, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, n, dim, generator=g, dtype=torch.float64).to(dtype)


def pool3d(x: torch.Tensor, grid, shape) -> torch.Tensor:
    """The spec's literal call: adaptive_avg_pool3d on X viewed as (D, F, h, w)."""
    frames, _, dim = x.shape
    volume = x.reshape(frames, *grid, dim).permute(3, 0, 1, 2)
    return nnf.adaptive_avg_pool3d(volume, shape).permute(1, 2, 3, 0).reshape(-1, dim)


# ---- equality with the literal reference and with adaptive_avg_pool3d -------------------------
@pytest.mark.parametrize("frames", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("temporal", [1, 2, 3])
def test_matches_literal(frames, temporal):
    for k, retention in enumerate([0.004, 0.05, 0.1, 0.25, 0.37, 0.6, 0.9, 1.0]):
        x = tokens(frames, seed=100 * frames + 10 * temporal + k)
        expected = reference_pllava(x, (14, 14), retention, temporal)
        y = pllava_pool(x, (14, 14), retention, temporal)
        assert y.dtype == torch.float64 and y.shape == expected.shape
        # separable means (a window of at most the 196-token grid, then over time) against the
        # literal window means (tests/helpers/tolerance.py)
        torch.testing.assert_close(y, expected, **close(torch.float64, 196, depth=2))
        y32 = pllava_pool(x.float(), (14, 14), retention, temporal)
        assert y32.dtype == torch.float32
        torch.testing.assert_close(y32.double(), expected, **close(torch.float32, 196, depth=2))  # likewise


@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (3, 5)])
def test_other_grids_match_literal(grid):
    for retention, temporal in [(0.3, 1), (0.5, 2), (1.0, 1), (0.05, 1)]:
        x = tokens(3, n=grid[0] * grid[1], seed=grid[0] + grid[1])
        # separable means (at most the whole grid, then over time) against the literal window means
        torch.testing.assert_close(pllava_pool(x, grid, retention, temporal),
                                   reference_pllava(x, grid, retention, temporal),
                                   **close(torch.float64, grid[0] * grid[1], depth=2))


@pytest.mark.parametrize("frames,retention,temporal", [
    (4, 0.25, 1), (5, 0.1, 2), (7, 0.6, 3), (32, 0.25, 1), (32, 0.1, 4), (3, 0.02, 1)])
def test_equals_the_spec_s_adaptive_avg_pool3d(frames, retention, temporal):
    x = tokens(frames, dim=8, seed=frames)
    shape = pooling_shape(frames, (14, 14), retention, temporal)
    # separable means against adaptive_avg_pool3d's one mean over a window of at most all frames * 196
    torch.testing.assert_close(pllava_pool(x, (14, 14), retention, temporal), pool3d(x, (14, 14), shape),
                               **close(torch.float64, frames * 196, depth=2))


def test_pooling_shape_matches_literal_everywhere():
    for frames in (1, 2, 3, 5, 16, 32):
        for temporal in (1, 2, 3, 4, 40):
            for step in range(1, 101):
                r = step / 100
                assert pooling_shape(frames, (14, 14), r, temporal) == reference_shape(frames, (14, 14), r, temporal)


# ---- exact counts and windows --------------------------------------------------------------------
@pytest.mark.parametrize("frames,retention,temporal,shape", [
    (32, 0.25, 1, (32, 7, 7)),    # 49 = 0.25 * 196 exactly
    (32, 0.1, 1, (32, 4, 5)),     # 19.6: 4x5 = 20 ties 2x10 on size, the squarer wins
    (32, 0.25, 2, (16, 7, 14)),   # 98 tokens per pooled frame, 16 frames
    (32, 0.25, 4, (8, 14, 14)),   # 196 per pooled frame: the full grid, 8 frames
    (5, 0.25, 2, (2, 7, 14)),     # round(2.5) = 2 (half to even)
    (3, 0.25, 2, (2, 7, 14)),     # round(1.5) = 2
    (2, 0.5, 8, (1, 14, 14)),     # round(0.25) = 0 -> at least one frame
    (4, 0.001, 1, (4, 1, 1)),     # fewer than one token per frame: one
    (4, 1.0, 1, (4, 14, 14)),
])
def test_exact_token_counts(frames, retention, temporal, shape):
    assert pooling_shape(frames, (14, 14), retention, temporal) == shape
    x = tokens(frames, dim=4, dtype=torch.float32)
    out = methods.build("pllava", retention=retention, temporal=temporal).compress(VisualInput(x, (14, 14)))
    assert out.shape == (shape[0] * shape[1] * shape[2], 4)


def test_overlapping_windows_by_hand():
    # channel 0 = row, 1 = column, 2 = frame: each output is the centre of its window
    frames = 3
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(14), torch.arange(14), indexing="ij")
    x = torch.stack([r, c, f], dim=-1).double().reshape(frames, 196, 3)
    assert reference_windows(14, 5) == [(0, 3), (2, 6), (5, 9), (8, 12), (11, 14)]
    out = pllava_pool(x, (14, 14), retention=10 / 196, temporal=2)  # 20 tokens per pooled frame
    assert pooling_shape(frames, (14, 14), 10 / 196, 2) == (2, 4, 5)
    rows = [(0 + 3) / 2, (3 + 6) / 2, (7 + 10) / 2, (10 + 13) / 2]  # windows [0,4) [3,7) [7,11) [10,14)
    cols = [1.0, 3.5, 6.5, 9.5, 12.0]
    times = [0.5, 1.5]  # windows [0, 2) and [1, 3) of 3 frames
    expected = torch.tensor([[rr, cc, tt] for tt in times for rr in rows for cc in cols], dtype=torch.float64)
    # float64 window means (at most 4 x 4 tokens, then 2 frames) against the arithmetic by hand
    torch.testing.assert_close(out, expected, **close(torch.float64, 16, depth=2))


def test_grid_choice_ties_go_to_the_squarer_grid():
    for r, grid in [(20 / 196, (4, 5)),  # 20: 4x5 and 2x10 equal in size
                    (7.5 / 196, (2, 4)),  # 8 (2x4) and 7 (1x7) equally far
                    (9 / 196, (3, 3)), (1.0, (14, 14)), (0.001, (1, 1))]:
        assert reference_grid(r, 14, 14) == grid
        assert pooling_shape(1, (14, 14), r, 1) == (1, *grid)


# ---- edge cases ----------------------------------------------------------------------------------
def test_full_retention_is_the_identity_and_equals_none():
    x = tokens(3, dtype=torch.float32)
    visual = VisualInput(x, (14, 14))
    out = methods.build("pllava", retention=1.0).compress(visual)
    assert torch.equal(out, methods.build("none").compress(visual).tokens)


def test_identical_tokens_stay_that_token():
    v = torch.randn(16, dtype=torch.float64)
    x = v.expand(5, 196, 16).clone()
    for retention, temporal in [(0.1, 1), (0.25, 2), (0.6, 3), (0.002, 1)]:
        out = pllava_pool(x, (14, 14), retention, temporal)
        # float64 means of copies of v against v: at most the 196-token grid, then over time
        torch.testing.assert_close(out, v.expand_as(out), **close(torch.float64, 196, depth=2))


def test_a_still_video_pooled_in_time_equals_one_frame_pooled_in_space():
    frame = tokens(1, dim=8, seed=3)
    still = frame.expand(6, 196, 8).clone()
    # two float64 poolings of the same frame: windows of at most the 196-token grid, then over time
    torch.testing.assert_close(pllava_pool(still, (14, 14), 0.25, 3), pllava_pool(frame, (14, 14), 0.75, 1).repeat(2, 1),
                               **close(torch.float64, 196, depth=2))


def test_bfloat16_input_is_pooled_in_float32():
    x = tokens(4, dtype=torch.bfloat16)
    y = pllava_pool(x, (14, 14), 0.1, 2)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, pllava_pool(x.float(), (14, 14), 0.1, 2).bfloat16())


def test_input_is_not_modified():
    x = tokens(4, dtype=torch.float32)
    before = x.clone()
    pllava_pool(x, (14, 14), 0.3, 2)
    assert torch.equal(x, before)


# ---- knobs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"retention": 0}, "pllava.retention=0: expected a value in (0.0, 1.0]"),
    ({"retention": 1.5}, "pllava.retention=1.5: expected a value in (0.0, 1.0]"),
    ({"retention": "0.3"}, "pllava.retention='0.3': expected a number"),
    ({"temporal": 0}, "pllava.temporal=0: expected an integer in [1, inf]"),
    ({"temporal": 1.5}, "pllava.temporal=1.5: expected an integer"),
    ({"temporal": True}, "pllava.temporal=True: expected an integer"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        methods.build("pllava", **knobs)
    with pytest.raises(ValueError, match=re.escape(message)):
        pllava_pool(torch.zeros(1, 196, 2), (14, 14), **{"retention": 0.25, "temporal": 1, **knobs})


def test_features_that_are_not_the_grid_are_rejected():
    with pytest.raises(ValueError, match="pllava: 195 tokens per frame do not form the 14x14 grid"):
        pllava_pool(torch.zeros(2, 195, 4), (14, 14), 0.25)


# ---- through the model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", 4), p.size, p.mean, p.std)


def test_full_retention_reproduces_the_uncompressed_logits(adapter, pixels):
    ids, _ = adapter.prompt_ids(QUESTION)
    logits = []
    for compressor in (methods.build("none"), methods.build("pllava", retention=1.0)):
        prompt = adapter.prepare(pixels, compressor, ids)
        logits.append(adapter.prefill(prompt, compressor, use_cache=False).logits)
    # full retention hands the LLM `none`'s tokens: the same kernels on the same inputs: exact
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


def test_the_model_sees_the_pooled_tokens_at_consecutive_positions(adapter, pixels):
    ids, _ = adapter.prompt_ids(QUESTION)
    compressor = methods.build("pllava", retention=0.25, temporal=2)
    prompt = adapter.prepare(pixels, compressor, ids)
    start, end = prompt.span
    assert end - start == 2 * 7 * 14 and prompt.run.video_tokens_out == 2 * 7 * 14
    assert torch.equal(prompt.positions[0], torch.arange(prompt.embeds.shape[1]))
    visual = adapter.encode(pixels).visual
    expected = reference_pllava(visual.features.float(), (14, 14), 0.25, 2)
    # float32 separable means against float64 window means (rounded to float32): a window of at
    # most the 196-token grid, then over time
    torch.testing.assert_close(prompt.embeds[0, start:end].double(), expected.to(prompt.embeds.dtype).double(),
                               **close(torch.float32, 196, depth=2))


@pytest.mark.slow
def test_runs_in_the_harness(cfg_factory):
    from harness.run.rundir import read_samples
    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=pllava", "retention=0.25", "task.limit=2"))
    records = read_samples(run_dir / "samples.jsonl")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert all(r["retention"]["rho_tok"] == pytest.approx(49 / 196) for r in records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    x = tokens(6, dim=32, dtype=torch.float32)
    for retention, temporal in [(0.25, 1), (0.1, 2), (0.6, 3)]:
        y = pllava_pool(x.cuda(), (14, 14), retention, temporal)
        assert y.is_cuda
        # float32 separable means on the GPU against float64 window means
        torch.testing.assert_close(y.cpu().double(), reference_pllava(x, (14, 14), retention, temporal),
                                   **close(torch.float32, 196, depth=2))
