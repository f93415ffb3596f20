"""FastVID (methods/fastvid.py) against its literal restatement
(tests/reference/fastvid.py, float64 loops), the golden file, the SigLIP head, and the tiny model.

The implementation decides in float32, the reference in float64: equality tests use inputs whose
decisions are at least SAFE away from flipping (the reference reports its smallest margin).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf

import methods
from methods import fastvid as fv
from methods.core.base import VideoTokens, VisualInput
from methods.fastvid import (
    FastVID,
    anchor_plan,
    budgets,
    fastvid_compress,
    load_siglip_head,
    segment_bounds,
    siglip_head_outputs,
)
from tests.reference.fastvid import reference_fastvid, reference_siglip_head
from tests.helpers import random_siglip
from tests.helpers.tolerance import close

GOLDEN = Path(__file__).parent / "golden" / "fastvid_golden.pt"
SAFE = 1e-5
LAYERS = 8  # decoder layers of the tiny smoke model
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def video(frames: int, per_frame: int, dim: int, seed: int, scenes: list[int] | None = None,
          dtype=torch.float32):
    """Clustered tokens, random saliency, and global features from per-scene prototypes (frames of
    one scene have cosine ~0.99, of different scenes ~0): (features, saliency, global)."""
    g = torch.Generator().manual_seed(seed)
    scenes = scenes if scenes is not None else [0] * frames
    prototypes = torch.randn(max(scenes) + 1, dim, generator=g, dtype=torch.float64)
    glob = prototypes[scenes] + 0.1 * torch.randn(frames, dim, generator=g, dtype=torch.float64)
    centroids = torch.randn(max(2, per_frame // 4), dim, generator=g, dtype=torch.float64)
    pick = torch.randint(0, centroids.shape[0], (frames, per_frame), generator=g)
    x = centroids[pick] + 0.5 * torch.randn(frames, per_frame, dim, generator=g, dtype=torch.float64)
    saliency = torch.rand(frames, per_frame, generator=g, dtype=torch.float64)
    return x.to(dtype), saliency.to(dtype), glob.to(dtype)


def knobs(retention=0.1, segments=8, seg_tau=0.9, context_share=0.4, anchor_every=4, merge_floor=0.6):
    return dict(retention=retention, segments=segments, seg_tau=seg_tau, context_share=context_share,
                anchor_every=anchor_every, merge_floor=merge_floor)


def assert_matches(out: VideoTokens, ref, x: torch.Tensor):
    assert out.positions.tolist() == ref.positions, "a different kept set"
    # the method (float32) against the float64 reference on the (F, N, D) input x: a merged token is
    # a cluster mean then a weighted sum with its anchor, at most all F * N tokens summed
    # (tests/helpers/tolerance.py)
    frames, n, _ = x.shape
    torch.testing.assert_close(out.tokens.double(), ref.tokens, **close(torch.float32, frames * n, depth=2))


# ----------------------------------------------------------------------------------------------
# Equality with the literal reference

CASES = [
    # frames, per_frame, dim, scenes, knobs
    (1, 196, 16, None, knobs()),  # one frame: no cut at all
    (5, 196, 16, [0, 0, 1, 1, 1], knobs()),  # odd frame count, c - 1 = 7 > F - 1 = 4 cuts
    (8, 196, 32, None, knobs(0.25, segments=1, seg_tau=-1.0)),  # one segment of 8: T = 2
    (13, 49, 16, [0] * 6 + [1] * 2 + [2] * 5, knobs(0.3, segments=3, seg_tau=0.5)),  # 6, 2, 5
    (6, 196, 16, None, knobs(0.1, segments=2, seg_tau=-1.0, anchor_every=2)),
    (7, 49, 16, None, knobs(0.9, segments=1, seg_tau=-1.0)),  # anchors clamped to M
    (4, 196, 16, None, knobs(1.0, segments=1, seg_tau=-1.0)),  # r = 1: every token kept or merged
    (9, 196, 16, None, knobs(0.1, segments=1, seg_tau=-1.0, anchor_every=1)),  # all single-frame
    (3, 196, 16, None, knobs(4.02 / 196, segments=1, seg_tau=-1.0, anchor_every=2)),  # degenerate
    (6, 49, 16, [0, 1, 2, 3, 4, 5], knobs(0.5, segments=8, merge_floor=0.2)),  # every frame a segment
    (10, 196, 24, [0] * 5 + [1] * 5, knobs(0.25, segments=2, seg_tau=0.5, context_share=0.7)),
]


@pytest.mark.parametrize("frames,per_frame,dim,scenes,settings", CASES)
@pytest.mark.slow
def test_matches_literal_reference(frames, per_frame, dim, scenes, settings):
    checked = 0
    for seed in range(6):
        x, sal, glob = video(frames, per_frame, dim, seed=100 * frames + seed, scenes=scenes)
        ref = reference_fastvid(x, sal, glob, **settings)
        if ref.margin < SAFE:
            continue  # a decision float32 round-off may legitimately flip
        out = fastvid_compress(x, sal, glob, **settings)
        assert out.tokens.dtype == torch.float32 and out.positions.dtype == torch.long
        assert_matches(out, ref, x)
        checked += 1
        if checked == 2:
            return
    pytest.fail(f"only {checked} inputs with safe margins")


def test_seeded_noise_matches_reference_with_the_same_draws():
    x, sal, glob = video(10, 196, 24, seed=7, scenes=[0] * 5 + [1] * 5)
    settings = knobs(0.25, segments=2, seg_tau=0.5)
    ref = reference_fastvid(x, sal, glob, **settings, noise_seed=3)
    assert ref.margin > SAFE
    out = fastvid_compress(x, sal, glob, **settings, generator=torch.Generator().manual_seed(3))
    assert_matches(out, ref, x)


def test_noise_breaks_exact_density_ties_by_the_seed():
    # two copies of each token: every density is tied with its twin, so the noise decides
    g = torch.Generator().manual_seed(0)
    half = torch.randn(1, 98, 16, generator=g)
    x = torch.cat([half, half], dim=1)
    sal = torch.zeros(1, 196)
    glob = torch.ones(1, 4)
    runs = [fastvid_compress(x, sal, glob, 0.5, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1, 2, 3, 4)]
    assert torch.equal(runs[0].positions, runs[1].positions)
    assert any(not torch.equal(r.positions, runs[0].positions) for r in runs[2:])


def test_golden_values():
    golden = torch.load(GOLDEN)
    out = fastvid_compress(golden["features"].float(), golden["saliency"].float(),
                           golden["global_features"].float(), **golden["knobs"],
                           generator=torch.Generator().manual_seed(golden["noise_seed"]))
    assert out.positions.tolist() == golden["positions"].tolist()
    # float32 here against float32 on the CPU that wrote the file (its own summation order): a
    # cluster mean then a weighted sum, at most all frames * N tokens summed
    frames, n, _ = golden["features"].shape
    torch.testing.assert_close(out.tokens, golden["expected"], **close(torch.float32, frames * n, depth=2))


# ----------------------------------------------------------------------------------------------
# Counts, segments, anchors


def test_budgets_floor_as_the_spec_says():
    assert budgets(196, 0.10, 0.4) == (19, 7, 12)  # official eval.sh setting
    assert budgets(196, 0.25, 0.4) == (49, 19, 30)
    assert budgets(196, 1.0, 0.4) == (196, 78, 118)
    assert budgets(196, 0.001, 0.4) == (1, 0, 1)  # at least one token per frame (deviation)


@pytest.mark.parametrize("scenes,segments,seg_tau,expected", [
    ([0] * 8, 1, -1.0, 96 + 2 * 28),  # L = 8: T = 2 anchor frames of floor(7*8/2) = 28
    ([0] * 5, 1, -1.0, 60 + 2 * 17),  # L = 5: T = 2 of floor(35/2) = 17: 34, short of 35
    ([0, 1, 2, 3, 4, 5, 6, 7], 8, 0.9, 8 * 19),  # every frame its own segment: n per frame
    ([0] * 4 + [1] * 4, 1, 0.5, 96 + 2 * 28),  # two segments of 4: one anchor frame each
    ([0] * 3, 1, -1.0, 36 + 21),  # L = 3: T = 1 of 21
])
def test_exact_token_counts(scenes, segments, seg_tau, expected):
    # r = 0.1 of 196: n = 19, n_c = 7, n_s = 12 per frame
    x, sal, glob = video(len(scenes), 196, 16, seed=1, scenes=scenes)
    out = fastvid_compress(x, sal, glob, 0.1, segments, seg_tau)
    assert out.tokens.shape == (expected, 16) and out.positions.shape == (expected,)
    assert bool((out.positions.diff() > 0).all())
    per_frame = torch.bincount(out.positions // 196, minlength=len(scenes))
    assert bool((per_frame >= 12).all())  # every frame keeps its salient tokens


def test_segments_cut_at_smallest_similarities_and_below_tau():
    # cosines of consecutive frames: 0.95, 0.2, 0.99, 0.5, 0.97 (angles between 2-D unit vectors)
    cos = [0.95, 0.2, 0.99, 0.5, 0.97]
    angles = torch.cumsum(torch.tensor([0.0] + [float(torch.tensor(c).acos()) for c in cos]), 0)
    glob = torch.stack([angles.cos(), angles.sin()], 1).double()
    assert segment_bounds(glob, 1, 0.9) == [(0, 2), (2, 4), (4, 6)]  # below tau only
    assert segment_bounds(glob, 2, 0.0) == [(0, 2), (2, 6)]  # the smallest only
    assert segment_bounds(glob, 3, 0.0) == [(0, 2), (2, 4), (4, 6)]  # the two smallest
    assert segment_bounds(glob, 4, 0.0) == [(0, 1), (1, 2), (2, 4), (4, 6)]
    assert segment_bounds(glob, 100, 0.0) == [(i, i + 1) for i in range(6)]  # clamped to F - 1
    assert segment_bounds(glob[:1], 8, 0.9) == [(0, 1)]
    # equal similarities: the earlier frame is cut first
    assert segment_bounds(torch.ones(4, 3), 2, -1.0) == [(0, 1), (1, 4)]


def test_anchor_plan_follows_the_official_distribution():
    plan = anchor_plan([(0, 1), (1, 6), (6, 15)], n_c=7, anchor_every=4, available=184)
    assert plan[0] == fv.MergeUnit(0, 1, (0,), 7)  # single frame
    # L = 5, p = 4: T = 2, anchors at i = 0 and 4 with floor(35 / 2) = 17
    assert plan[1] == fv.MergeUnit(1, 5, (1, 5), 17)
    # L = 9: T = 3, anchors at i = 0, 4, 8 with floor(63 / 3) = 21
    assert plan[2] == fv.MergeUnit(6, 9, (6, 10, 14), 21)
    # degenerate: p = 2, L = 3, n_c = 1 -> floor(3 / 2) = 1 = n_c: single-frame anchors 0 and 2
    assert anchor_plan([(0, 3)], 1, 2, 190) == [fv.MergeUnit(0, 1, (0,), 1), fv.MergeUnit(2, 1, (2,), 1)]
    # clamped to the M available tokens
    assert anchor_plan([(0, 4)], 70, 4, 90) == [fv.MergeUnit(0, 4, (3,), 90)]
    assert anchor_plan([(0, 4)], 0, 4, 90) == []


def test_density_scores_run_in_one_batch(monkeypatch):
    calls = []
    real = fv.density_peaks

    def counting(x, k, generator=None, distance=None):
        calls.append(tuple(x.shape))
        return real(x, k, generator, distance)

    monkeypatch.setattr(fv, "density_peaks", counting)
    x, sal, glob = video(13, 49, 16, seed=2, scenes=[0] * 6 + [1] * 2 + [2] * 5)
    fastvid_compress(x, sal, glob, **knobs(0.3, segments=3, seg_tau=0.5))
    # segments 6, 2, 5 with p = 4: anchor frames 1, 5 | 7 | 8, 12 -> one (5, M, D) batch
    assert calls == [(5, 49 - 9, 16)]  # M = 49 - n_s


# ----------------------------------------------------------------------------------------------
# Edge cases


def test_full_retention_without_context_is_the_identity():
    x, sal, glob = video(5, 196, 16, seed=3, scenes=[0, 0, 0, 1, 1])
    out = fastvid_compress(x, sal, glob, 1.0, context_share=0.0)
    assert torch.equal(out.tokens, x.flatten(0, 1)) and torch.equal(out.positions, torch.arange(5 * 196))


@pytest.mark.parametrize("scenes,segments,anchor_every", [([0, 1, 2, 3], 8, 4), ([0, 0, 0, 0], 1, 1)])
def test_full_retention_with_single_frame_anchors_keeps_every_token(scenes, segments, anchor_every):
    # n_c = M: every non-salient token is an anchor that merges only with itself: 0.6a + 0.4a
    x, sal, glob = video(4, 196, 16, seed=4, scenes=scenes)
    assert len(segment_bounds(glob, segments, 0.9)) == (4 if segments == 8 else 1)
    out = fastvid_compress(x, sal, glob, 1.0, segments, 0.9, anchor_every=anchor_every)
    assert torch.equal(out.positions, torch.arange(4 * 196))
    torch.testing.assert_close(out.tokens, x.flatten(0, 1), **close(torch.float32, 2))  # a 2-term sum


def test_identical_tokens():
    v = torch.randn(16)
    x = v.expand(6, 196, 16).clone()
    sal = torch.zeros(6, 196)
    out = fastvid_compress(x, sal, torch.ones(6, 8), 0.1, 1, 0.9)
    # one segment of 6 (all similarities 1): 6 * 12 salient + T = 2 anchor frames of 21
    assert out.tokens.shape == (6 * 12 + 2 * 21, 16)
    # float32 merges of copies of v against v: a cluster mean over at most 6 * 196 copies, then a
    # weighted sum with the anchor
    torch.testing.assert_close(out.tokens, v.expand_as(out.tokens), **close(torch.float32, 6 * 196, depth=2))
    # equal saliency and equal scores: the lowest indices win
    assert out.positions[:12].tolist() == list(range(12))
    assert out.positions[12:45].tolist() == list(range(196, 196 + 33))  # anchor frame 1


def test_no_context_without_context_share():
    x, sal, glob = video(3, 196, 16, seed=5)
    out = fastvid_compress(x, sal, glob, 0.25, context_share=0.0)
    keep = torch.sort(-sal, dim=1, stable=True).indices[:, :49].sort(1).values
    assert torch.equal(out.positions, (keep + torch.arange(3)[:, None] * 196).flatten())


def test_bfloat16_input_decides_in_float32():
    x, sal, glob = video(6, 196, 32, seed=6, scenes=[0, 0, 0, 0, 1, 1])
    out = fastvid_compress(x.bfloat16(), sal, glob, 0.25)
    out32 = fastvid_compress(x.bfloat16().float(), sal, glob, 0.25)
    assert out.tokens.dtype == torch.bfloat16
    assert torch.equal(out.positions, out32.positions)
    assert torch.equal(out.tokens, out32.tokens.bfloat16())


def test_input_is_not_modified():
    x, sal, glob = video(4, 49, 16, seed=8)
    before = [t.clone() for t in (x, sal, glob)]
    fastvid_compress(x, sal, glob, 0.5, 1, -1.0)
    assert all(torch.equal(a, b) for a, b in zip((x, sal, glob), before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_reference():
    settings = knobs(0.25, segments=2, seg_tau=0.5)
    for seed in range(6):
        x, sal, glob = video(10, 196, 64, seed=seed, scenes=[0] * 5 + [1] * 5)
        ref = reference_fastvid(x, sal, glob, **settings, noise_seed=1)
        if ref.margin > SAFE:
            out = fastvid_compress(x.cuda(), sal.cuda(), glob.cuda(), **settings,
                                   generator=torch.Generator().manual_seed(1))
            assert out.tokens.is_cuda and out.positions.is_cuda
            assert_matches(VideoTokens(out.tokens.cpu(), out.positions.cpu()), ref, x)
            return
    pytest.fail("no input with safe margins")


# ----------------------------------------------------------------------------------------------
# Knobs


@pytest.mark.parametrize("knob,value,message", [
    ("retention", 0.0, r"fastvid.retention=0.0: expected a value in \(0.0, 1.0\]"),
    ("retention", 1.5, r"fastvid.retention=1.5: expected a value in \(0.0, 1.0\]"),
    ("retention", float("nan"), "fastvid.retention=nan"),
    ("segments", 0, r"fastvid.segments=0: expected an integer in \[1, inf\]"),
    ("segments", 2.5, "fastvid.segments=2.5: expected an integer"),
    ("seg_tau", 1.2, r"fastvid.seg_tau=1.2: expected a value in \[-1.0, 1.0\]"),
    ("context_share", -0.1, r"fastvid.context_share=-0.1: expected a value in \[0.0, 1.0\]"),
    ("anchor_every", 0, "fastvid.anchor_every=0: expected an integer"),
    ("anchor_every", True, "fastvid.anchor_every=True: expected an integer"),
    ("merge_floor", 2, r"fastvid.merge_floor=2: expected a value in \[0.0, 1.0\]"),
    ("siglip_path", "/no/such/dir", "fastvid.siglip_path='/no/such/dir': expected null"),
    ("siglip_path", 3, "fastvid.siglip_path=3: expected a string or null"),
])
def test_bad_knobs_are_rejected(knob, value, message):
    with pytest.raises(ValueError, match=message):
        methods.build("fastvid", **{knob: value})


def test_defaults_are_the_official_ones_and_the_head_is_recorded():
    m = methods.build("fastvid")
    assert type(m) is FastVID and m.stages == frozenset({"visual"})
    assert m.knobs() == {"retention": 0.1, "segments": 8, "seg_tau": 0.9, "context_share": 0.4,
                         "anchor_every": 4, "merge_floor": 0.6, "siglip_path": None}
    assert m.head == "fallback" and m.needs == frozenset({"patch_scores"})
    m2 = m.with_knob("retention", 0.3)
    assert m2.retention == 0.3 and m2.head == "fallback" and m2.needs == m.needs


def test_config_composes_and_records_the_head(cfg_factory):
    from tests.helpers import choice_of

    choice = choice_of(cfg_factory("+method=fastvid", "retention=0.25"))
    assert choice.knobs["retention"] == 0.25 and choice.knobs["siglip_path"] is None
    assert choice.label == "r=0.25" and choice.target_retention is None
    assert choice.compressor.head == "fallback"


# ----------------------------------------------------------------------------------------------
# The SigLIP head


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip") / "vision"
    random_siglip().save_pretrained(path)
    return path


def head_state(path: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    return {k.rsplit("vision_model.", 1)[-1]: v for k, v in state.items()
            if k.rsplit("vision_model.", 1)[-1].startswith(("head.", "post_layernorm."))}


def test_head_attention_matches_the_literal_head(siglip_dir):
    hidden = torch.randn(3, 729, 32, generator=torch.Generator().manual_seed(1))
    head = load_siglip_head(str(siglip_dir))
    pooled, attention = siglip_head_outputs(hidden, head)
    ref_pooled, ref_attention = reference_siglip_head(hidden, head_state(siglip_dir), heads=4, eps=1e-6)
    assert attention.shape == (3, 729) and pooled.shape == (3, 32)
    # float32 against a float64 transcription: the longest sums run over the 729 patches, through
    # the head's attention and its MLP (tests/helpers/tolerance.py)
    torch.testing.assert_close(attention.double(), ref_attention, **close(torch.float32, 729, depth=2))
    torch.testing.assert_close(pooled.double(), ref_pooled, **close(torch.float32, 729, depth=3))
    assert float(ref_attention.max()) > 5 / 729  # a peaked map, not a uniform one


def test_head_loads_only_the_vision_head_of_a_full_siglip_checkpoint(tmp_path, siglip_dir):
    from transformers import SiglipConfig, SiglipModel

    vision = random_siglip(seed=1)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    full = SiglipModel(SiglipConfig(vision_config=vision.config.to_dict(), text_config=text))
    full.vision_model.load_state_dict(vision.state_dict())
    full.save_pretrained(tmp_path / "full")
    head = load_siglip_head(str(tmp_path / "full"))
    for name, value in head.state_dict().items():
        assert torch.equal(value, vision.state_dict()[name])  # the same weights, read back: exact


def test_checkpoint_without_a_head_is_an_error(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, image_size=28, patch_size=14, vision_use_head=False)
    SiglipVisionModel(config).save_pretrained(tmp_path / "nohead")
    with pytest.raises(ValueError, match="no attention-pooling head"):
        load_siglip_head(str(tmp_path / "nohead"))


def pooled(maps: torch.Tensor) -> torch.Tensor:
    """27x27 -> 14x14 bilinear, as the official get_attn_2dPool."""
    frames = maps.shape[0]
    return nnf.interpolate(maps.view(frames, 1, 27, 27), size=(14, 14), mode="bilinear").view(frames, -1)


def test_adapter_with_the_head_equals_the_reference(siglip_dir):
    m = methods.build("fastvid", retention=0.25, segments=2, seg_tau=0.0, siglip_path=str(siglip_dir))
    assert m.head == str(siglip_dir) and m.needs == frozenset({"encoder_hidden"})
    m.seed = 5
    for seed in range(5):
        x, _, _ = video(6, 196, 24, seed=9 + seed)
        hidden = torch.randn(6, 729, 32, generator=torch.Generator().manual_seed(seed))
        glob, attention = reference_siglip_head(hidden, head_state(siglip_dir), heads=4, eps=1e-6)
        ref = reference_fastvid(x, pooled(attention), glob, **knobs(0.25, 2, 0.0), noise_seed=5)
        if ref.margin > SAFE:
            break
    else:
        pytest.fail("no input with safe margins")
    out = m.compress(VisualInput(x, (14, 14), encoder_hidden=hidden))
    assert_matches(out, ref, x)


def test_adapter_fallback_equals_the_reference():
    # two scenes of four frames: each frame is its scene's tokens plus a little noise
    g = torch.Generator().manual_seed(10)
    scenes = [video(1, 196, 24, seed=s)[0] for s in (11, 12)]
    x = torch.cat([scenes[0].expand(4, -1, -1), scenes[1].expand(4, -1, -1)])
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    scores = torch.rand(8, 729, generator=g)
    m = methods.build("fastvid", retention=0.25, segments=1)
    m.seed = 2
    out = m.compress(VisualInput(x, (14, 14), patch_scores=scores))
    ref = reference_fastvid(x, pooled(scores), x.double().mean(1), **knobs(0.25, 1), noise_seed=2)
    assert ref.margin > SAFE
    assert [length for _, length in ref.segments] == [4, 4]
    assert_matches(out, ref, x)


def test_missing_inputs_and_a_mismatched_head_are_errors(siglip_dir):
    x = torch.randn(2, 196, 8)
    with pytest.raises(ValueError, match="patch_scores"):
        methods.build("fastvid").compress(VisualInput(x, (14, 14)))
    with_head = methods.build("fastvid", siglip_path=str(siglip_dir))
    with pytest.raises(ValueError, match="encoder_hidden"):
        with_head.compress(VisualInput(x, (14, 14), patch_scores=torch.rand(2, 729)))
    with pytest.raises(ValueError, match="takes 32-d features, the encoder gives 16-d"):
        with_head.compress(VisualInput(x, (14, 14), encoder_hidden=torch.randn(2, 729, 16)))


# ----------------------------------------------------------------------------------------------
# Through the tiny model


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    from harness.models.llava_onevision import LlavaOneVision

    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    from harness.data.video import preprocess, read_frames

    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", 4),
                      p.size, p.mean, p.std)


def logits(adapter, pixels, compressor):
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    with torch.no_grad():
        return prompt, adapter.prefill(prompt, compressor, use_cache=False).logits


@pytest.mark.parametrize("settings,exact", [({"context_share": 0.0}, True),
                                            ({"anchor_every": 1, "segments": 1}, False)])
def test_full_retention_reproduces_none(adapter, pixels, settings, exact):
    _, expected = logits(adapter, pixels, methods.build("none"))
    prompt, out = logits(adapter, pixels, methods.build("fastvid", retention=1.0, **settings))
    assert prompt.span[1] - prompt.span[0] == 4 * 196
    if exact:
        assert torch.equal(out, expected)
    else:  # every anchor merges only itself: 0.6a + 0.4a, equal up to rounding
        # that 2-term rounding, carried through attention sums over every key in each of LAYERS
        # layers (tests/helpers/tolerance.py)
        torch.testing.assert_close(out, expected, **close(torch.float32, out.shape[1], depth=LAYERS + 1))


def test_kept_tokens_keep_their_original_positions(adapter, pixels):
    m = methods.build("fastvid", retention=0.25)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, m, ids)
    visual = adapter.encode(pixels, m.needs).visual
    expected = m.compress(visual)
    start, end = prompt.span
    assert end - start == expected.positions.numel()
    torch.testing.assert_close(prompt.positions[0, start:end], start + expected.positions)
    # the newline and the text after the video sit where they would without compression
    full = len(ids) - 1 + 4 * 196 + 1
    assert int(prompt.positions[0, -1]) == full - 1


@pytest.mark.slow
def test_head_path_on_the_tiny_model(tmp_path, cfg_factory):
    """encoder_hidden of the tiny model (32-d) through a 32-d SigLIP head, end to end."""
    from tests.helpers import run_config

    path = tmp_path / "siglip32"
    random_siglip(hidden=32, heads=2, seed=3).save_pretrained(path)
    run_dir = run_config(cfg_factory("+method=fastvid", "retention=0.25", f"method.siglip_path={path}",
                              "task.limit=2"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"]["knobs"]["siglip_path"] == str(path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["knobs"]["siglip_path"] == str(path)
    assert summary["method_notes"] == {"fastvid_head": str(path)} == config["method"]["notes"]
    # 8 frames at r = 0.25: 30 salient + at most 19 context tokens per frame
    assert 30 / 196 <= summary["retention"]["rho_tok"]["mean"] <= 49 / 196


@pytest.mark.slow
def test_harness_run_records_the_fallback_head(cfg_factory):
    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=fastvid", "retention=0.25", "task.limit=2"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"]["knobs"]["siglip_path"] is None  # the fallback head
    assert config["config"]["method"]["siglip_path"] is None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "fastvid" and summary["knobs"]["siglip_path"] is None
    assert summary["method_notes"] == {"fastvid_head": "fallback"} == config["method"]["notes"]
    # 8 frames at r = 0.25: 30 salient + at most 19 context tokens per frame
    assert 30 / 196 <= summary["retention"]["rho_tok"]["mean"] <= 49 / 196
