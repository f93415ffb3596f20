"""methods/evs.py against vLLM's EVS as its docstring states it and its literal restatement.

The literal reference (tests/reference/evs.py) recomputes every dissimilarity with Python loops in
float64; float64 input makes the implementation decide in float64 too, float32 comparisons use inputs
whose cut is at least SAFE from a tie. Structured inputs (one-hot tokens) have exact cosines, so their
ties are ties on both sides.
"""

from __future__ import annotations

import json

import pytest
import torch

import methods
from methods.core.base import VideoTokens, VisualInput
from methods.evs import EVS, evs_budget, evs_compress, evs_dissimilarity
from tests.reference.evs import reference_evs, retained_tokens_count

SAFE = 1e-5
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def tokens(frames: int, per_frame: int, dim: int, seed: int, dtype=torch.float32, drift: float = 0.5) -> torch.Tensor:
    """Frames that drift from the previous one by a random amount per token (near and far pairs)."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(per_frame, dim, generator=g, dtype=torch.float64)]
    for _ in range(frames - 1):
        step = torch.rand(per_frame, 1, generator=g, dtype=torch.float64) * drift * 2
        x.append(x[-1] + step * torch.randn(per_frame, dim, generator=g, dtype=torch.float64))
    return torch.stack(x).to(dtype)


# ----------------------------------------------------------------------------------------------
# Equality with the literal reference

CASES = [(2, 49, 16, 0.25), (4, 49, 8, 0.1), (8, 16, 8, 0.5), (3, 196, 16, 0.3), (5, 9, 4, 0.9), (6, 25, 8, 1.0),
         (1, 49, 8, 0.25), (16, 4, 4, 0.05)]


@pytest.mark.parametrize("frames,per_frame,dim,retention", CASES)
def test_matches_literal_float64(frames, per_frame, dim, retention):
    x = tokens(frames, per_frame, dim, seed=frames * 100 + per_frame + dim, dtype=torch.float64)
    ref = reference_evs(x, retention)
    assert ref.gap > 1e-12, "input too close to a tie for float64"
    out = evs_compress(x, retention)
    assert out.positions.tolist() == ref.keep
    assert torch.equal(out.tokens, ref.output)
    torch.testing.assert_close(evs_dissimilarity(x).flatten(), torch.tensor(ref.dissimilarity, dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("frames,per_frame,dim,retention", [(4, 196, 32, 0.25), (8, 49, 16, 0.1), (3, 64, 64, 0.6)])
def test_matches_literal_float32(frames, per_frame, dim, retention):
    for seed in range(10):
        x = tokens(frames, per_frame, dim, seed=seed)
        ref = reference_evs(x, retention)
        if ref.gap < SAFE:
            continue
        out = evs_compress(x, retention)
        assert out.positions.tolist() == ref.keep and torch.equal(out.tokens, ref.output)
        return
    pytest.fail("no input with a safe margin")


# ----------------------------------------------------------------------------------------------
# Counts and structured inputs


@pytest.mark.parametrize("frames,per_frame", [(1, 196), (2, 196), (8, 196), (32, 196), (3, 10), (5, 391), (7, 1)])
def test_exact_token_counts_are_vllm_s(frames, per_frame):
    x = torch.randn(frames, per_frame, 4)
    for retention in (0.001, 0.1, 0.125, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0):
        k = retained_tokens_count(per_frame, frames, 1.0 - retention)
        assert evs_budget(retention, frames, per_frame) == k >= per_frame
        assert evs_compress(x, retention).tokens.shape == (k, 4)
    # vLLM truncates T*N*(1 - q): with q = 1 - 0.1 = 0.9, 1 - q = 0.09999999999999998
    assert evs_budget(0.1, 100, 10) == 99 and evs_budget(0.25, 8, 196) == 392 and evs_budget(0.01, 8, 196) == 196


def onehot(index: int, dim: int = 8, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.eye(dim, dtype=torch.float64)[index]


def test_first_frame_survives_and_ties_go_to_the_lower_index():
    # frame 0: 4 tokens; frame 1: tokens 0 and 2 unchanged (scaled: still d = 0), 1 orthogonal (d = 1),
    # 3 opposite (d = 2); frame 2: all unchanged from frame 1 but token 1 (d = 1)
    f0 = torch.stack([onehot(0), onehot(1), onehot(2), onehot(3)])
    f1 = torch.stack([onehot(0, scale=3.0), onehot(4), onehot(2, scale=0.5), -onehot(3)])
    f2 = torch.stack([f1[0], onehot(5), f1[2], f1[3]])
    x = torch.stack([f0, f1, f2])
    d = evs_dissimilarity(x)
    assert d.tolist() == [[255.0] * 4, [0.0, 1.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0]]
    # K = 6: frame 0 (4), then d = 2 (flat 7), then the first d = 1 (flat 5) before flat 9
    assert evs_compress(x, 0.5).positions.tolist() == [0, 1, 2, 3, 5, 7] == reference_evs(x, 0.5).keep
    # K = 8: then flat 9 (d = 1), then the first d = 0 ties: flat 4
    assert evs_compress(x, 8 / 12).positions.tolist() == [0, 1, 2, 3, 4, 5, 7, 9] == reference_evs(x, 8 / 12).keep
    # below one frame's worth the first frame alone
    assert evs_compress(x, 0.01).positions.tolist() == [0, 1, 2, 3]


def test_static_video_keeps_the_first_frame_then_the_lowest_indices():
    x = onehot(2).expand(4, 6, 8).clone()  # every frame identical: d = 0 exactly after frame 0
    assert evs_compress(x, 0.5).positions.tolist() == list(range(12)) == reference_evs(x, 0.5).keep


def test_duplicate_tokens_within_a_frame_do_not_matter():
    x = tokens(3, 16, 8, seed=3, dtype=torch.float64)
    x[:, 5] = x[:, 4]  # two positions carrying the same token: each compared with its own predecessor
    ref = reference_evs(x, 0.4)
    assert evs_compress(x, 0.4).positions.tolist() == ref.keep


def test_zero_tokens_have_dissimilarity_one():
    x = tokens(3, 16, 8, seed=4, dtype=torch.float64)
    x[1, 3] = 0  # against a token: cosine 0
    x[2, 7] = 0
    x[1, 7] = 0  # zero against zero: cosine 0 too
    d = evs_dissimilarity(x)
    assert d[1, 3] == 1 and d[2, 3] == 1 and d[2, 7] == 1 and not torch.isnan(d).any()
    assert evs_compress(x, 0.5).positions.tolist() == reference_evs(x, 0.5).keep


def test_one_frame_keeps_everything():
    x = tokens(1, 196, 8, seed=5)
    for retention in (0.01, 0.25, 1.0):
        out = evs_compress(x, retention)
        assert torch.equal(out.tokens, x[0]) and out.positions.tolist() == list(range(196))


def test_full_retention_is_the_identity():
    x = tokens(5, 49, 16, seed=6)
    out = evs_compress(x, 1.0)
    assert torch.equal(out.tokens, x.flatten(0, 1)) and torch.equal(out.positions, torch.arange(5 * 49))


def test_output_is_in_original_order():
    x = tokens(6, 49, 16, seed=7)
    out = evs_compress(x, 0.3)
    assert bool((out.positions.diff() > 0).all())
    assert torch.equal(out.tokens, x.flatten(0, 1)[out.positions])


def test_bfloat16_input_decides_in_float32():
    x = tokens(4, 49, 16, seed=8).bfloat16()
    out = evs_compress(x, 0.3)
    assert out.tokens.dtype == torch.bfloat16
    assert torch.equal(out.positions, evs_compress(x.float(), 0.3).positions)


def test_input_is_not_modified():
    x = tokens(3, 49, 16, seed=9)
    before = x.clone()
    evs_compress(x, 0.25)
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------------------------
# Knobs and the compressor


@pytest.mark.parametrize("retention, message", [
    (0, r"evs.retention=0: expected a value in \(0.0, 1.0\]"),
    (1.01, "evs.retention=1.01"),
    ("0.25", "evs.retention='0.25': expected a number"),
    (float("nan"), "evs.retention=nan"),
])
def test_rejects_bad_knobs(retention, message):
    with pytest.raises(ValueError, match=message):
        EVS(retention=retention)
    with pytest.raises(ValueError, match=message):
        evs_compress(torch.randn(2, 4, 8), retention)


def test_rejects_bad_positions():
    with pytest.raises(ValueError, match="evs.positions='kept': expected one of compact, original or null"):
        EVS(positions="kept")


@pytest.mark.parametrize("shape", [(4, 8), (0, 4, 8), (2, 0, 8)])
def test_rejects_bad_features(shape):
    with pytest.raises(ValueError, match="features"):
        evs_compress(torch.randn(shape), 0.25)


def test_registered_positions_follow_the_model():
    method = methods.build("evs", retention=0.3)
    assert isinstance(method, EVS) and method.stages == {"visual"} and method.needs == frozenset()
    assert method.retention_knob.knob == "retention" and method.retention_knob.direct
    x = tokens(4, 196, 16, seed=10)
    expected = evs_compress(x, 0.3)
    onevision = VisualInput(x, (14, 14))  # 1-D positions: consecutive
    assert torch.equal(method.compress(onevision), expected.tokens)
    qwen = VisualInput(x, (14, 14), patch_grid=(28, 28), mrope=True)  # M-RoPE ids kept
    out = method.compress(qwen)
    assert isinstance(out, VideoTokens) and torch.equal(out.positions, expected.positions)
    # the positions knob overrides the model's rule either way
    out = EVS(retention=0.3, positions="original").compress(onevision)
    assert isinstance(out, VideoTokens) and torch.equal(out.positions, expected.positions)
    assert torch.equal(EVS(retention=0.3, positions="compact").compress(qwen), expected.tokens)
    with pytest.raises(ValueError, match="do not form the 10x10 grid"):
        method.compress(VisualInput(x, (10, 10)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    for seed in range(20, 40):
        x = tokens(8, 196, 64, seed=seed)
        ref = reference_evs(x, 0.25)
        if ref.gap > SAFE:
            out = evs_compress(x.cuda(), 0.25)
            assert out.tokens.is_cuda and out.positions.cpu().tolist() == ref.keep
            return
    pytest.fail("no input with a safe margin")


# ----------------------------------------------------------------------------------------------
# Through the models


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl"])
def family(request, tiny_llava, qwen, smoke_questions):
    adapter = {"llava_onevision": tiny_llava, "qwen2_5_vl": qwen}[request.param]
    path = str(smoke_questions.parent / "videos" / "clip_003.mp4")
    return request.param, adapter, adapter.load_video(path, 4)


def test_full_retention_reproduces_none_s_logits(family):
    _, adapter, video = family
    ids, _ = adapter.prompt_ids(QUESTION)
    encoded = adapter.encode_video(video)
    logits = []
    for method in (EVS(retention=1.0), methods.build("none")):
        prompt = adapter.prompt(adapter.compress(encoded, method), ids)
        logits.append(adapter.prefill(prompt, method, use_cache=False).logits)
    assert torch.equal(logits[0], logits[1])  # the same tokens at the same positions: the same kernels


def test_runs_on_both_families_with_their_position_rule(family):
    name, adapter, video = family
    method = EVS(retention=0.5)
    ids, _ = adapter.prompt_ids(QUESTION)
    encoded = adapter.encode_video(video)
    visual = encoded.visual
    expected = evs_compress(visual.features, 0.5)
    prompt = adapter.prompt(adapter.compress(encoded, method), ids)
    full = adapter.prompt(adapter.compress(encoded, methods.build("none")), ids)
    start, end = prompt.span
    assert end - start == prompt.run.video_tokens_out == evs_budget(0.5, *visual.features.shape[:2])
    torch.testing.assert_close(prompt.embeds[0, start:end], expected.tokens)
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

    cfg = cfg_factory("+method=evs", "retention=0.25", "task.limit=2")
    summary = json.loads((run_config(cfg) / "summary.json").read_text())
    assert summary["method"] == "evs" and summary["knobs"] == {"retention": 0.25, "positions": None}
    assert summary["retention"]["rho_tok"]["mean"] == pytest.approx(0.25)
