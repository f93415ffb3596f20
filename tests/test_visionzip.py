"""VisionZip (methods/visionzip.py) against its literal restatement, by hand, and through the model.

tests/reference/visionzip.py works per frame and per token with Python loops in float64, from the
encoder's per-patch scores and keys (its own bilinear resize). The method makes its decisions in
float32, so random inputs are compared only where the reference's decision margins are at least
SAFE (a float32 flip is impossible there); the rest is exact hand-made cases.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core.base import VisualInput
from methods.visionzip import token_split, visionzip_compress
from tests.helpers.tolerance import bound, close
from tests.reference.visionzip import (
    reference_bilinear,
    reference_split,
    reference_visionzip,
    reference_visionzip_pooled,
)

SAFE = 1e-5
GOLDEN = Path(__file__).parent / "golden" / "visionzip_golden.pt"
RETENTIONS = [0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0]


def inputs(frames: int, dim: int = 16, channels: int = 8, seed: int = 0, dtype=torch.float32):
    """Features (F, 196, D), patch scores (F, 729) and patch keys (F, 729, C)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(frames, 196, dim, generator=g, dtype=torch.float64).to(dtype)
    scores = torch.rand(frames, 729, generator=g)
    keys = torch.randn(frames, 729, channels, generator=g)
    return features, scores, keys


def compress(features, scores, keys, retention):
    return methods.build("visionzip", retention=retention).compress(VisualInput(features, (14, 14), scores, keys))


# ---- equality with the literal reference ---------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 3, 5])
@pytest.mark.parametrize("retention", RETENTIONS)
def test_matches_literal(frames, retention):
    checked = 0
    for seed in range(20):
        features, scores, keys = inputs(frames, seed=1000 * frames + seed)
        ref = reference_visionzip(features, scores, keys, (14, 14), retention)
        if min(ref.score_margin, ref.cosine_margin) < SAFE:
            continue  # a decision float32 round-off could legitimately flip
        y = compress(features, scores, keys, retention)
        assert y.dtype == torch.float32 and y.shape == ref.output.shape
        # float32 means against float64 means: a contextual token averages at most a frame's 196
        # tokens (tests/helpers/tolerance.py)
        torch.testing.assert_close(y.double(), ref.output, **close(torch.float32, 196))
        y64 = compress(features.double(), scores, keys, retention)  # float64 means, same decisions
        assert y64.dtype == torch.float64
        torch.testing.assert_close(y64, ref.output, **close(torch.float64, 196))  # the same means, in float64
        checked += 1
        if checked == 2:
            return
    pytest.fail(f"only {checked} inputs with safe margins")


def test_reference_resize_is_the_feature_pooling():
    # the reference's literal bilinear taps equal torch's resize that LLaVA-OneVision pools with
    _, _, keys = inputs(2, seed=4)
    maps = keys.double().view(2, 27, 27, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(maps, size=(14, 14), mode="bilinear", align_corners=False)
    # two float64 computations of the same taps: a source coordinate of up to 27, a few operations
    # deep (scale, product, offset) in rows and columns, computed in another order moves each
    # weight by that bound, the value by it times the step between neighbours (at most 2 max|keys|)
    tol = bound(torch.float64, 27, depth=6)
    torch.testing.assert_close(reference_bilinear(keys, 14, 14), expected.flatten(2).mT, rtol=tol,
                               atol=tol * 2 * float(keys.abs().max()))


def test_pure_function_on_pooled_inputs_matches_literal():
    g = torch.Generator().manual_seed(7)
    features = torch.randn(3, 36, 5, generator=g, dtype=torch.float64)
    scores, keys = torch.rand(3, 36, generator=g), torch.randn(3, 36, 4, generator=g)
    for retention in (0.05, 0.2, 0.5, 0.75, 1.0):
        ref = reference_visionzip_pooled(features, scores, keys, retention)
        assert min(ref.score_margin, ref.cosine_margin) > SAFE
        # float64 means against float64 means: a contextual token averages at most a frame's 36 tokens
        torch.testing.assert_close(visionzip_compress(features, scores, keys, retention), ref.output,
                                   **close(torch.float64, 36))


# ---- budget and counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("k, split", [
    (1, (1, 0)), (2, (2, 0)), (3, (3, 0)), (4, (3, 1)),  # round(k*54/64): no contextual for k <= 3
    (16, (14, 2)), (48, (40, 8)),  # 13.5 and 40.5: Python's round, half to even
    (20, (17, 3)),  # the official int() gives 16 + 4
    (49, (41, 8)), (64, (54, 10)), (196, (165, 31)),
])
def test_token_split(k, split):
    assert token_split(k / 196, 196) == split


def test_token_split_matches_literal_for_every_budget():
    for step in range(1, 1001):
        r = step / 1000
        assert token_split(r, 196) == reference_split(r, 196)
        assert sum(token_split(r, 196)) == max(1, round(r * 196))


@pytest.mark.parametrize("retention", RETENTIONS)
def test_exact_token_counts(retention):
    features, scores, keys = inputs(3, dim=4, seed=1)
    assert compress(features, scores, keys, retention).shape == (3 * max(1, round(retention * 196)), 4)


# ---- by hand -------------------------------------------------------------------------------------
def hand_frame():
    """One 4x4 frame (16 tokens): token i has feature e_i, so an output shows what it averages."""
    features = torch.eye(16, dtype=torch.float64)[None]
    scores = torch.linspace(0.0, 1.0, 16)[None].flip(-1).clone()  # token 0 most attended
    scores[0, [3, 9]] = 2.0  # ... but 3 and 9 most of all
    return features, scores


def test_hand_example_dominant_targets_and_mean_merge():
    features, scores = hand_frame()
    # k = 12: k_d = round(10.125) = 10 dominant = {3, 9} + {0, 1, 2, 4, 5, 6, 7, 8}; R = [10..15]
    # (6 tokens), k_c = 2, step 3: targets 10 and 13. Keys: 11, 14 near 13; 12, 15 near 10.
    keys = torch.zeros(1, 16, 2)
    keys[0, :, 0] = 1.0
    keys[0, [13, 11, 14], 1] = torch.tensor([1.0, 0.9, 2.0])
    keys[0, [10, 12, 15], 1] = torch.tensor([0.0, -0.1, 0.2])
    assert token_split(12 / 16, 16) == (10, 2)
    out = visionzip_compress(features, scores, keys, 12 / 16)
    dominant = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    expected = torch.cat([features[0, dominant],
                          features[0, [10, 12, 15]].mean(0, keepdim=True),  # (x_t + members) / 3
                          features[0, [13, 11, 14]].mean(0, keepdim=True)])
    # the method's means of 3 tokens against torch's and the reference's (float64)
    torch.testing.assert_close(out, expected, **close(torch.float64, 3))
    ref = reference_visionzip_pooled(features, scores, keys, 12 / 16)
    assert ref.targets == [[10, 13]] and ref.members == [[[12, 15], [11, 14]]]
    torch.testing.assert_close(out, ref.output, **close(torch.float64, 3))
    # the official merge, target + mean(members), would give a different token
    official = features[0, 10] + features[0, [12, 15]].mean(0)
    assert not torch.allclose(out[10], official, **close(torch.float64, 3))


def test_equal_scores_go_to_the_lower_index_and_equal_keys_to_the_first_target():
    features = torch.eye(16, dtype=torch.float64)[None]
    scores, keys = torch.ones(1, 16), torch.ones(1, 16, 3)
    out = visionzip_compress(features, scores, keys, 8 / 16)  # k = 8: k_d = round(6.75) = 7, k_c = 1
    assert torch.equal(out[:7], features[0, :7])  # dominant tokens are copies: exact
    torch.testing.assert_close(out[7], features[0, 7:].mean(0), **close(torch.float64, 9))  # two means of 9
    out = visionzip_compress(features, scores, keys, 12 / 16)  # k_d = 10, k_c = 2: targets 10, 13
    # all to target 10: two means of 5
    torch.testing.assert_close(out[10], features[0, [10, 11, 12, 14, 15]].mean(0), **close(torch.float64, 5))
    assert torch.equal(out[11], features[0, 13])  # a target without members is a copy: exact


def test_zero_keys_have_cosine_zero_and_join_the_first_target():
    features = torch.eye(16, dtype=torch.float64)[None]
    scores, keys = hand_frame()[1], torch.randn(1, 16, 3)
    keys[0, 10:] = 0
    out = visionzip_compress(features, scores, keys, 12 / 16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[10], features[0, [10, 11, 12, 14, 15]].mean(0), **close(torch.float64, 5))
    assert torch.equal(out[11], features[0, 13])  # a target without members is a copy: exact


def test_no_contextual_tokens_below_four_per_frame():
    features, scores, keys = inputs(3, seed=2)
    pooled = torch.nn.functional.interpolate(scores.view(3, 1, 27, 27), size=(14, 14), mode="bilinear").flatten(1)
    for k in (1, 2, 3):
        top = pooled.argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values
        expected = features.gather(1, top[..., None].expand(-1, -1, 16)).flatten(0, 1)
        assert torch.equal(compress(features, scores, keys, k / 196), expected)


def test_full_retention_keeps_every_token_dominant_first():
    features, scores, keys = inputs(2, seed=3)
    ref = reference_visionzip(features, scores, keys, (14, 14), 1.0)
    out = compress(features, scores, keys, 1.0).view(2, 196, 16)
    for f in range(2):
        rest = [i for i in range(196) if i not in ref.dominant[f]]
        assert ref.targets[f] == rest and all(m == [] for m in ref.members[f])  # 31 singletons
        assert torch.equal(out[f], features[f, ref.dominant[f] + rest])
    # the same tokens as `none`, reordered (so not `none`'s logits)
    none = methods.build("none").compress(VisualInput(features, (14, 14))).tokens
    assert torch.equal(out.flatten(0, 1).sort(dim=0).values, none.sort(dim=0).values)
    assert not torch.equal(out.flatten(0, 1), none)


def test_identical_tokens_give_that_token():
    v = torch.randn(16)
    features = v.expand(3, 196, 16).clone()
    _, scores, keys = inputs(3, seed=5)
    for retention in (0.01, 0.1, 0.25, 1.0):
        out = compress(features, scores, keys, retention)
        # float32 means of copies of v against v: at most a frame's 196 copies summed
        torch.testing.assert_close(out, v.expand_as(out), **close(torch.float32, 196))


def test_bfloat16_features():
    features, scores, keys = inputs(3, seed=6)
    y = compress(features.bfloat16(), scores, keys, 0.25)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, compress(features.bfloat16().float(), scores, keys, 0.25).bfloat16())


def test_inputs_are_not_modified():
    features, scores, keys = inputs(2, seed=8)
    copies = [t.clone() for t in (features, scores, keys)]
    compress(features, scores, keys, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(copies, (features, scores, keys)))


def test_golden_values():
    golden = torch.load(GOLDEN)
    out = compress(golden["features"].float(), golden["patch_scores"].float(), golden["patch_keys"].float(),
                   golden["retention"])
    assert out.shape == golden["expected"].shape
    # float32 here against float32 on the CPU that wrote the file (its own summation order): means of
    # at most a frame's 196 tokens
    torch.testing.assert_close(out, golden["expected"], **close(torch.float32, 196))


# ---- knobs and inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("retention, message", [
    (0, "visionzip.retention=0: expected a value in (0.0, 1.0]"),
    (1.01, "visionzip.retention=1.01: expected a value in (0.0, 1.0]"),
    ("0.1", "visionzip.retention='0.1': expected a number"),
    (None, "visionzip.retention=None: expected a number"),
])
def test_bad_retention_is_rejected(retention, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        methods.build("visionzip", retention=retention)
    with pytest.raises(ValueError, match=re.escape(message)):
        visionzip_compress(torch.zeros(1, 4, 2), torch.zeros(1, 4), torch.zeros(1, 4, 2), retention)


def test_missing_scores_or_keys_are_an_error():
    features, scores, _ = inputs(2)
    compressor = methods.build("visionzip")
    for visual in (VisualInput(features, (14, 14)), VisualInput(features, (14, 14), scores)):
        with pytest.raises(ValueError, match=r"visionzip needs .*\(patch_scores, patch_keys\)"):
            compressor.compress(visual)
    with pytest.raises(ValueError, match=r"scores \(3, 196\) and keys \(2, 196, 8\) do not match features"):
        visionzip_compress(features, torch.zeros(3, 196), torch.zeros(2, 196, 8), 0.1)


# ---- through the model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


def test_on_the_encoder_s_own_scores_and_keys(adapter, smoke_questions):
    p = adapter.preprocessing
    compressor = methods.build("visionzip", retention=0.05)
    assert compressor.needs == frozenset({"patch_scores"})
    checked = 0
    for clip in sorted((smoke_questions.parent / "videos").glob("clip_*.mp4"))[:6]:
        pixels = preprocess(read_frames(clip, 4), p.size, p.mean, p.std)
        visual = adapter.encode(pixels, needs=compressor.needs).visual
        out = compressor.compress(visual)
        assert out.shape == (4 * 10, visual.features.shape[2])
        ref = reference_visionzip(visual.features, visual.patch_scores, visual.patch_keys, (14, 14), 0.05)
        if min(ref.score_margin, ref.cosine_margin) > SAFE:  # smooth keys: some cosines nearly tie
            # float32 means against float64 means: at most a frame's 196 tokens
            torch.testing.assert_close(out.double(), ref.output, **close(torch.float32, 196))
            checked += 1
    assert checked >= 2


@pytest.mark.slow
def test_runs_in_the_harness(cfg_factory):
    from harness.run.rundir import read_samples
    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=visionzip", "retention=0.1", "task.limit=2"))
    records = read_samples(run_dir / "samples.jsonl")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert all(r["retention"]["rho_tok"] == pytest.approx(20 / 196) for r in records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    for seed in range(10):
        features, scores, keys = inputs(4, dim=32, seed=500 + seed)
        ref = reference_visionzip(features, scores, keys, (14, 14), 0.25)
        if min(ref.score_margin, ref.cosine_margin) > SAFE:
            y = compress(features.cuda(), scores.cuda(), keys.cuda(), 0.25)
            assert y.is_cuda
            # float32 means on the GPU against float64 means: at most a frame's 196 tokens
            torch.testing.assert_close(y.cpu().double(), ref.output, **close(torch.float32, 196))
            return
    pytest.fail("no input with safe margins")
