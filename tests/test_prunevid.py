"""PruneVid (methods/prunevid.py) against the official code restated literally and the stock model.

Visual stage: equality with tests/reference/prunevid.py (float64 loops, official order, then the
harness's position order) on fixed-seed videos whose decisions float32 cannot flip, edge cases,
exact counts, golden values. Prefill stage: the kept set is each group's top int(size * llm_keep)
of a literal recomputation of the official score (no RoPE, no causal mask, max over heads then
queries) from the stock model's hidden states; the cached prefill and decode equal the stock eager
model run uncached on the whole sequence with the pruned tokens masked from layer llm_layer + 1 on,
at the original positions; retention targeting reaches its target.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from harness.run.calibrate import TOLERANCE
from methods.core import decoder
from methods.core.flops import LLMShape
from methods.prunevid import (
    PruneVid,
    PruneVidPrefill,
    frame_segments,
    keep_per_group,
    prunevid_compress,
    question_scores,
    refine_labels,
)
from tests.helpers.tolerance import bound, close, close_probabilities
from tests.reference.prunevid import (
    reference_keep,
    reference_prunevid,
    refine_clusters,
    segment_lengths,
)

GOLDEN = Path(__file__).parent / "golden" / "prunevid_golden.pt"
SAFE = 1e-5  # decisions at least this far (relative) from flipping: float32 cannot flip them
LAYERS = 8  # decoder layers of the tiny smoke model
FRAMES = 8
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def video(frames: int, per_frame: int, dim: int, seed: int, scenes: int = 3, static: float = 0.5,
          noise: float = 0.15, dtype=torch.float64, cuts: list[int] | None = None) -> torch.Tensor:
    """Scenes of consecutive frames (an offset of their own, so frame means separate them), cut
    at `cuts` or at random; in a scene a share `static` of the positions barely changes, the
    others are redrawn every frame."""
    g = torch.Generator().manual_seed(seed)
    if cuts is None:
        cuts = sorted(random.Random(seed).sample(range(1, frames), min(scenes, frames) - 1)) if frames > 1 else []
    x = torch.empty(frames, per_frame, dim, dtype=torch.float64)
    for a, b in zip([0] + cuts, cuts + [frames]):
        offset = 2 * torch.randn(dim, generator=g, dtype=torch.float64)
        base = torch.randn(per_frame, dim, generator=g, dtype=torch.float64)
        still = torch.rand(per_frame, generator=g) < static
        for t in range(a, b):
            fresh = torch.randn(per_frame, dim, generator=g, dtype=torch.float64)
            jitter = base + noise * torch.randn(per_frame, dim, generator=g, dtype=torch.float64)
            x[t] = offset + torch.where(still[:, None], jitter, fresh)
    return x.to(dtype)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_against_reference(x, ref, out):
    tokens, positions, groups, _ = ref.in_position_order()
    assert out.tokens.shape == tokens.shape, f"M = {out.tokens.shape[0]}, expected {tokens.shape[0]}"
    assert out.positions.tolist() == positions
    assert out.groups.tolist() == groups
    # the method (float32, from either input) against the float64 reference: a token is a time mean
    # then a cluster mean, at most all frames * N tokens summed (tests/helpers/tolerance.py)
    frames, n, _ = x.shape
    torch.testing.assert_close(out.tokens.double(), tokens, **close(torch.float32, frames * n, depth=2))


# ---- the visual stage against the literal reference ----------------------------------------------
SHAPES = [(1, 196, 8), (2, 49, 8), (3, 49, 16), (5, 196, 8), (8, 196, 16), (16, 49, 8), (9, 100, 12)]
SETTINGS = [(0.25, 0.8, 0.5), (0.5, 0.8, 0.3), (0.25, 0.6, 0.7), (0.2, 0.9, 0.1)]


@pytest.mark.parametrize("frames, per_frame, dim", SHAPES)
def test_matches_literal_reference(frames, per_frame, dim):
    """The same segments, static sets, clusters, positions and groups; tokens equal to float64."""
    checked = 0
    for seed in range(20):
        segment_ratio, tau, cluster_ratio = SETTINGS[seed % len(SETTINGS)]
        x = video(frames, per_frame, dim, seed=seed + 7 * frames)
        ref = reference_prunevid(x, segment_ratio, tau, cluster_ratio, seeded(seed))
        if ref.margin < SAFE:
            continue  # a decision float32 round-off may legitimately flip
        out = prunevid_compress(x, segment_ratio, tau, cluster_ratio, seeded(seed))
        assert out.tokens.dtype == torch.float64
        check_against_reference(x, ref, out)
        # and from float32 input: the method computes in float32 from either input, the same kernels
        # on the same values: exact
        out32 = prunevid_compress(x.float(), segment_ratio, tau, cluster_ratio, seeded(seed))
        assert out32.tokens.dtype == torch.float32 and out32.positions.tolist() == out.positions.tolist()
        torch.testing.assert_close(out32.tokens, out.tokens.float(), rtol=0, atol=0)
        checked += 1
        if checked == 2:
            break
    assert checked == 2, "too few inputs with safe margins"


@pytest.mark.slow
def test_reference_inputs_exercise_every_branch():
    """The fixed-seed videos above have several segments, static and dynamic sets on both sides of
    the 14-token threshold (otherwise the equality tests would not test them)."""
    seen = set()
    for frames, per_frame, dim in SHAPES:
        for seed in range(3):
            segment_ratio, tau, cluster_ratio = SETTINGS[seed % len(SETTINGS)]
            ref = reference_prunevid(video(frames, per_frame, dim, seed=seed + 7 * frames),
                                     segment_ratio, tau, cluster_ratio, seeded(seed))
            seen.add(("segments", len(ref.window_sizes) > 1))
            for s, d, w in zip(ref.static_sizes, ref.dynamic_sizes, ref.window_sizes):
                seen.add(("static", s > 0))
                seen.add(("dynamic clustered", d < w * per_frame))
    assert seen >= {("segments", True), ("segments", False), ("static", True), ("static", False),
                    ("dynamic clustered", True)}


def test_identical_tokens():
    """Every position is static (cosine 1) and the frame means coincide: one segment whose static
    set of N tokens clusters into int(N * 0.5) tokens, all equal to v, in the segment's first
    frame. Which positions become centres is decided by round-off and the seeded noise (distances
    between identical tokens are round-off in the matmul form, as in the official cdist), so only
    the reference's counts and sizes are compared."""
    v = torch.randn(16, dtype=torch.float64)
    x = v.expand(6, 196, 16).clone()
    ref = reference_prunevid(x, generator=seeded(3))
    out = prunevid_compress(x, generator=seeded(3))
    assert ref.window_sizes == [6] and ref.static_sizes == [98] and ref.dynamic_sizes == [0]
    assert out.tokens.shape[0] == 98 and out.groups.tolist() == [6] * 98  # the segment's static group
    assert len(set(out.positions.tolist())) == 98 and int(out.positions.max()) < 196
    # float32 means of copies of v against v: a time mean over 6 frames, then cluster means, at most
    # 6 * 196 copies summed
    torch.testing.assert_close(out.tokens, v.expand(98, 16), **close(torch.float32, 6 * 196, depth=2))
    assert torch.equal(out.tokens, prunevid_compress(x, generator=seeded(3)).tokens)


def test_single_frame_has_no_static_tokens():
    x = video(1, 196, 8, seed=4)
    out = prunevid_compress(x, tau=-1.0, generator=seeded(0))  # even tau=-1: W = 1 has no pairs
    assert out.tokens.shape[0] == 98 and set(out.groups.tolist()) == {0}
    ref = reference_prunevid(x, tau=-1.0, generator=seeded(0))
    check_against_reference(x, ref, out)


def test_keep_everything_knobs_return_the_input():
    """tau=1 (nothing static: the mean cosine is capped at 1) and cluster_ratio=1 (every token its
    own cluster): the tokens themselves, at their own positions, grouped by frame."""
    x = video(5, 196, 8, seed=5, dtype=torch.float32)
    x[3] = x[2]  # identical frames: cosine 1 (up to round-off), still not > 1
    out = prunevid_compress(x, tau=1.0, cluster_ratio=1.0, generator=seeded(0))
    assert torch.equal(out.tokens, x.flatten(0, 1))
    assert out.positions.tolist() == list(range(5 * 196))
    assert out.groups.tolist() == [t for t in range(5) for _ in range(196)]


def expected_count(sizes, frames_per_segment, per_frame, ratio):
    def clustered(n):
        return int(n * ratio) if n > 14 else n
    return sum(clustered(s) + w * clustered(per_frame - s) for s, w in zip(sizes, frames_per_segment))


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3, 0.5, 0.77, 1.0])
def test_token_counts_are_exact(ratio):
    x = video(12, 196, 8, seed=6, dtype=torch.float32)
    segments = frame_segments(x, 0.25, seeded(1))
    out = prunevid_compress(x, cluster_ratio=ratio, generator=seeded(1))
    unit = torch.nn.functional.normalize(x, dim=-1)
    sizes, lengths = [], []
    for a, b in segments:
        w = b - a
        total = torch.einsum("wlc,tlc->l", unit[a:b], unit[a:b])
        sizes.append(int((((total - w) / (w * (w - 1))) > 0.8).sum()) if w > 1 else 0)
        lengths.append(w)
    assert out.tokens.shape[0] == expected_count(sizes, lengths, 196, ratio)
    assert len(out.positions) == len(out.groups) == out.tokens.shape[0]
    assert torch.all(out.positions[1:] > out.positions[:-1])  # ascending, distinct


def test_segments_follow_scene_changes():
    x = video(16, 49, 8, seed=8, cuts=[4, 6, 11])
    assert frame_segments(x, 0.25, seeded(0)) == [(0, 4), (4, 6), (6, 11), (11, 16)]  # 4 clusters
    assert frame_segments(x, 0.1, seeded(0)) == [(0, 16)]  # int(1.6) = 1 cluster
    assert frame_segments(x, 0.01, seeded(0)) == [(0, 16)]  # int(0.16) = 0: at least one
    # a one-frame scene is never a segment of its own (its label's longest run is one frame)
    segments = frame_segments(video(16, 49, 8, seed=8, cuts=[4, 5, 11]), 0.25, seeded(0))
    assert all(b - a >= 2 for a, b in segments) and segments[0][0] == 0 and segments[-1][1] == 16
    assert all(segments[i][1] == segments[i + 1][0] for i in range(len(segments) - 1))


def test_contiguity_refinement_equals_the_official_loop():
    rng = random.Random(0)
    cases = [list(p) for n in range(1, 7) for p in itertools.product(range(3), repeat=n)]
    cases += [[rng.randrange(8) for _ in range(32)] for _ in range(300)]
    for labels in cases:
        refined = refine_labels(labels)
        assert refined == refine_clusters(labels), labels
        assert -1 not in refined
    # a worked example: label 1's longest run is one frame; label 0 keeps its longer run
    assert refine_labels([0, 0, 1, 0, 2, 2, 1, 1]) == [0, 0, 0, 0, 2, 2, 1, 1]
    assert segment_lengths([3, 3, 1, 1, 1, 0]) == [2, 3, 1]


def test_bfloat16_input():
    x = video(6, 196, 16, seed=9, dtype=torch.bfloat16)
    y = prunevid_compress(x, generator=seeded(2))
    y32 = prunevid_compress(x.float(), generator=seeded(2))
    assert y.tokens.dtype == torch.bfloat16
    assert torch.equal(y.positions, y32.positions) and torch.equal(y.groups, y32.groups)
    assert torch.equal(y.tokens, y32.tokens.bfloat16())  # decisions in float32 on the same values


def test_input_is_not_modified_and_the_seed_decides():
    x = torch.zeros(4, 49, 8)  # every density ties: the seeded noise decides the centres
    x[:, :, 0] = torch.arange(49.0) % 3
    before = x.clone()
    a = prunevid_compress(x, tau=1.0, generator=seeded(0))
    assert torch.equal(x, before)
    b = prunevid_compress(x, tau=1.0, generator=seeded(0))
    assert torch.equal(a.positions, b.positions) and torch.equal(a.tokens, b.tokens)
    others = [prunevid_compress(x, tau=1.0, generator=seeded(s)).positions for s in (1, 2, 3)]
    assert any(not torch.equal(o, a.positions) for o in others)


def test_golden_values():
    golden = torch.load(GOLDEN)
    x = golden["features"].float()
    out = prunevid_compress(x, golden["segment_ratio"], golden["tau"], golden["cluster_ratio"],
                            seeded(golden["seed"]))
    assert out.positions.tolist() == golden["positions"].tolist()
    assert out.groups.tolist() == golden["groups"].tolist()
    # float32 here against float32 on the CPU that wrote the file (its own summation order): a time
    # mean then a cluster mean, at most all frames * N tokens summed
    frames, n, _ = x.shape
    torch.testing.assert_close(out.tokens, golden["tokens"], **close(torch.float32, frames * n, depth=2))
    kept = keep_per_group(golden["scores"], out.groups, golden["llm_keep"])
    assert kept.tolist() == golden["kept"].tolist()


# ---- per-group selection ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_group_selection_equals_the_official_window_loop(seed):
    """keep_per_group on the harness's order = process_attention on the official order."""
    x = video(8, 49, 8, seed=seed + 20)
    ref = reference_prunevid(x, 0.25, 0.7, 0.5, seeded(seed))
    _, positions, groups, order = ref.in_position_order()
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (len(positions),), generator=g).float()  # many ties
    official_scores = [0.0] * len(positions)
    for harness_index, official_index in enumerate(order):
        official_scores[official_index] = float(scores[harness_index])
    for alpha in (0.4, 0.1, 0.75, 1.0):
        kept = reference_keep(official_scores, ref.static_sizes, ref.dynamic_sizes, ref.window_sizes, alpha)
        expected = sorted(order.index(k) for k in kept)
        ours = keep_per_group(scores, torch.tensor(groups), alpha)
        # ties: the official order and ours rank tied tokens of a group differently; compare sets of
        # scores per group, then the exact indices where every group's order agrees
        for group in set(groups):
            mine = sorted(float(scores[i]) for i in ours.tolist() if groups[i] == group)
            theirs = sorted(float(scores[i]) for i in expected if groups[i] == group)
            assert mine == theirs
    distinct = torch.randperm(len(positions), generator=g).float()
    for alpha in (0.4, 0.1):
        official = [0.0] * len(positions)
        for harness_index, official_index in enumerate(order):
            official[official_index] = float(distinct[harness_index])
        kept = reference_keep(official, ref.static_sizes, ref.dynamic_sizes, ref.window_sizes, alpha)
        assert keep_per_group(distinct, torch.tensor(groups), alpha).tolist() == sorted(order.index(k) for k in kept)


def test_group_selection_ties_go_to_the_lower_index():
    scores = torch.tensor([0.3, 0.3, 0.1, 0.3, 0.5, 0.5, 0.5, 0.0])
    groups = torch.tensor([2, 2, 2, 2, 0, 0, 0, 0])
    assert keep_per_group(scores, groups, 0.5).tolist() == [0, 1, 4, 5]
    assert keep_per_group(scores, groups, 0.3).tolist() == [0, 4]
    assert keep_per_group(scores, groups, 0.2).tolist() == []  # int(4 * 0.2) = 0: the group is dropped


def test_planned_counts():
    groups = torch.tensor([0] * 7 + [1] * 3 + [5] * 10 + [9] * 2)
    policy = PruneVidPrefill(score_layer=3, keep=0.4, depth=8)
    kept = int(7 * 0.4) + int(3 * 0.4) + int(10 * 0.4) + int(2 * 0.4)
    assert policy.layers == (4,)
    assert policy.planned(22, groups) == [22] * 4 + [kept] * 4
    assert policy.planned(22) == [22] * 4 + [int(22 * 0.4)] * 4  # no groups: one group


# ---- knobs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"segment_ratio": 0.0}, r"prunevid.segment_ratio=0.0: expected a value in \(0.0, 1.0\]"),
    ({"tau": 1.5}, r"prunevid.tau=1.5: expected a value in \[-1.0, 1.0\]"),
    ({"cluster_ratio": -0.1}, r"prunevid.cluster_ratio=-0.1"),
    ({"cluster_ratio": "half"}, "prunevid.cluster_ratio='half'"),
    ({"llm_keep": 0.0}, r"prunevid.llm_keep=0.0: expected a value in \(0.0, 1.0\]"),
    ({"llm_layer": -1}, "prunevid.llm_layer=-1"), ({"llm_layer": 2.5}, "prunevid.llm_layer=2.5"),
    ({"llm_layer": True}, "prunevid.llm_layer=True"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("prunevid", **knobs)


def test_default_layer_is_the_official_one_scaled():
    assert [LLMShape(0, 0, d).scaled_layer(10, highest=d - 2) for d in (28, 8, 3)] == [10, 3, 1]
    assert PruneVid().prefill_policy(LLMShape(64, 128, 28)).layers == (11,)
    with pytest.raises(ValueError, match=r"prunevid.llm_layer=7: expected a layer in \[0, 6\]"):
        PruneVid(llm_layer=7).prefill_policy(LLMShape(64, 128, 8))


# ---- inside the tiny model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_007.mp4", FRAMES),
                      p.size, p.mean, p.std)


def prefill(adapter, pixels, compressor, **kwargs):
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    with torch.no_grad():
        out = adapter.prefill(prompt, compressor, **kwargs)
    return prompt, out


@pytest.mark.parametrize("use_cache", [False, True])
def test_keep_everything_reproduces_the_unpruned_logits(adapter, pixels, use_cache):
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    with torch.no_grad():
        expected = adapter.prefill(adapter.prepare(pixels, none, ids), none, use_cache=False).logits
    prompt, out = prefill(adapter, pixels, PruneVid(tau=1.0, cluster_ratio=1.0, llm_keep=1.0),
                          use_cache=use_cache)
    # keeping everything runs the same kernels on the same inputs in the same order as `none`: exact
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert prompt.run.layer_video_tokens == [FRAMES * 196] * LAYERS


@torch.no_grad()
def literal_scores(adapter, embeds, positions, span, layer) -> list[float]:
    """The official score of every video token, from the stock model's input to `layer`: per head,
    softmax over all keys of q.k / sqrt(hd) without rotary embedding or mask (float64), max over
    heads, then max over every token after the video."""
    lm = adapter.model.model.language_model
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, position_ids=positions, output_hidden_states=True).hidden_states[layer]
    module = lm.layers[layer]
    attn = module.self_attn
    x = module.input_layernorm(hidden)[0].double()
    q = x @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
    k = x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    hd, heads = attn.head_dim, lm.config.num_attention_heads
    per_kv = heads // lm.config.num_key_value_heads
    start, end = span
    scores = [-math.inf] * (end - start)
    for h in range(heads):
        kh = k[:, (h // per_kv) * hd:(h // per_kv + 1) * hd]
        for i in range(end, x.shape[0]):
            logits = kh @ q[i, h * hd:(h + 1) * hd] / math.sqrt(hd)
            weights = torch.softmax(logits, 0)
            for j in range(start, end):
                scores[j - start] = max(scores[j - start], float(weights[j]))
    return scores


def literal_group_keep(scores, groups, keep) -> list[int]:
    kept = []
    for group in sorted(set(groups)):
        members = [j for j in range(len(groups)) if groups[j] == group]
        members.sort(key=lambda j: (-scores[j], j))
        kept += members[:int(len(members) * keep)]
    return sorted(kept)


@pytest.mark.parametrize("llm_layer, llm_keep", [(None, 0.4), (1, 0.25), (5, 0.6)])
def test_selection_is_the_official_score_per_group(adapter, pixels, llm_layer, llm_keep):
    compressor = PruneVid(llm_layer=llm_layer, llm_keep=llm_keep)
    prompt, out = prefill(adapter, pixels, compressor, use_cache=False)
    layer = 3 if llm_layer is None else llm_layer
    start, end = prompt.span
    scores = literal_scores(adapter, prompt.embeds, prompt.positions, prompt.span, layer)
    groups = prompt.groups.tolist()
    expected = literal_group_keep(scores, groups, llm_keep)
    assert [p - start for p in out.kept.tolist() if start <= p < end] == expected
    # the one-pass scores equal the literal ones
    lm = adapter.model.model.language_model
    with torch.no_grad():
        hidden = lm(inputs_embeds=prompt.embeds, position_ids=prompt.positions,
                    output_hidden_states=True).hidden_states[layer]
        ours = question_scores(lm.layers[layer], hidden, torch.arange(end, hidden.shape[1]),
                               torch.arange(start, end))
    # float32 against float64 on the same layer input: projections, then softmax rows over every key
    torch.testing.assert_close(ours.double(), torch.tensor(scores, dtype=torch.float64),
                               **close_probabilities(torch.float32, hidden.shape[1], depth=2))
    # the counts: every layer up to llm_layer sees the visual stage's tokens, later ones the kept
    visual = end - start
    assert prompt.run.layer_video_tokens == [visual] * (layer + 1) + [len(expected)] * (LAYERS - layer - 1)
    assert compressor.prefill_policy(LLMShape(64, 128, LAYERS)).planned(visual, prompt.groups) == \
        prompt.run.layer_video_tokens
    assert prompt.run.video_tokens_out == len(expected)


def masked_reference_logits(eager, embeds, positions, kept_prompt, first_pruned):
    """Logits of the stock eager model on `embeds` at `positions`, every layer over every token,
    layers >= first_pruned forbidden to attend to the prompt tokens not in kept_prompt."""
    total, prompt = embeds.shape[1], kept_prompt[-1] + 1
    allowed = torch.ones(total, dtype=torch.bool)
    allowed[sorted(set(range(prompt)) - set(kept_prompt))] = False
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = torch.zeros(total, total).masked_fill(~(causal & allowed), torch.finfo(torch.float32).min)

    def pruned_mask(module, args, kwargs):
        kwargs["attention_mask"] = mask[None, None]
        return args, kwargs

    layers = eager.model.model.language_model.layers
    hooks = [layers[i].register_forward_pre_hook(pruned_mask, with_kwargs=True)
             for i in range(first_pruned, len(layers))]
    try:
        with torch.no_grad():
            return eager.model(inputs_embeds=embeds, position_ids=positions).logits[0]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("llm_layer", [None, 2])
def test_cached_decoding_matches_masked_full_recompute(adapter, eager, pixels, llm_layer):
    """With the visual stage's tokens at their original positions and the kept set S chosen after
    layer llm_layer, PruneVid is the stock model on prompt + generated tokens where layers up to
    llm_layer attend causally to everything and later layers to S and the generated tokens only,
    without a cache. The cached prefill and every decode step give those logits, and the layers'
    caches hold what they saw (all tokens below the pruning layer: the spec's contract)."""
    steps, compressor = 6, PruneVid(llm_layer=llm_layer)
    first = (3 if llm_layer is None else llm_layer) + 1
    prompt, out = prefill(adapter, pixels, compressor, use_cache=True)
    embeds, positions, kept = prompt.embeds, prompt.positions, out.kept.tolist()
    reference = masked_reference_logits(eager, embeds, positions, kept, first)
    # the pruned cached prefill against the masked eager full forward: attention sums over at most
    # every prompt key, in each of LAYERS layers (tests/helpers/tolerance.py)
    torch.testing.assert_close(out.logits[0], reference[kept], **close(torch.float32, embeds.shape[1], depth=LAYERS))

    state, logits, tokens = out.state, out.logits[0, -1], []
    embed = adapter.model.get_input_embeddings()
    for _ in range(steps):
        token = int(logits.argmax())
        if token in adapter.stop_ids:
            break
        tokens.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)  # after the last original position
        with torch.no_grad():
            logits = decoder.decode(adapter.llm, state, torch.tensor([[token]]))[0, -1]
        # cached decode against the uncached masked eager recompute: embeds.shape[1] keys, LAYERS layers
        torch.testing.assert_close(logits, masked_reference_logits(eager, embeds, positions, kept, first)[-1],
                                   **close(torch.float32, embeds.shape[1], depth=LAYERS))
    assert tokens
    assert [layer.keys.shape[-2] for layer in state.cache.layers] == (
        [prompt.embeds.shape[1] + len(tokens)] * first + [len(kept) + len(tokens)] * (LAYERS - first))

    text, run = adapter.generate(pixels, QUESTION, compressor, max_new_tokens=steps)
    assert text == adapter.tokenizer.decode(tokens, skip_special_tokens=True)
    assert 0 < run.timings["compressor"]


def test_original_positions_reach_every_layer(adapter, pixels):
    """The visual stage's tokens take their input positions (the text after the video where it
    would be uncompressed); after pruning the kept ones keep theirs."""
    compressor = PruneVid()
    lm = adapter.model.model.language_model
    seen = []
    hook = lm.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    try:
        prompt, out = prefill(adapter, pixels, compressor, use_cache=True)
    finally:
        hook.remove()
    start, end = prompt.span
    visual = compressor.compress(adapter.encode(pixels).visual)
    positions = prompt.positions[0]
    assert positions[start:end].tolist() == (start + visual.positions).tolist()
    assert positions[end].item() == start + FRAMES * 196  # the newline
    assert positions[:start].tolist() == list(range(start))
    assert len(seen) == 2 and torch.equal(seen[0], prompt.positions)
    assert torch.equal(seen[1][0], positions[out.kept])
    assert out.state.next_position.item() == positions[-1].item() + 1


@pytest.mark.parametrize("target, knobs", [(0.25, {"tau": 1.0}), (0.05, {})])
@pytest.mark.slow
def test_retention_target_calibrates_cluster_ratio(cfg_factory, adapter, target, knobs):
    """`+method=prunevid retention=r`: the mean rho_tok (video tokens at the first pruned layer over
    F*N) on the calibration set is within the harness's window, equals what the method's own
    counts give per document, and what a real prefill counts. On the smoke task the tiny model's
    frames are almost entirely static at tau = 0.8, so 0.25 needs tau = 1 (no static merging)."""
    from harness.data.tasks import load_tasks, prepare_task_data
    from harness.run.calibrate import calibrate, calibration_set
    from tests.helpers import choice_of, job_of

    cfg = cfg_factory("+method=prunevid", f"retention={target}", *[f"method.{k}={v}" for k, v in knobs.items()])
    choice = choice_of(cfg)
    assert choice.target_retention == target
    prepare_task_data(job_of(cfg).task)
    tasks = load_tasks(job_of(cfg).task)
    size = cfg.task.calibration_size
    result = calibrate(choice.compressor, target, adapter, tasks, frames=cfg.model.frames, size=size, identity={})
    assert result["achieved_on_calibration"] == pytest.approx(target, abs=TOLERANCE)
    tuned = PruneVid(cluster_ratio=result["knobs"]["cluster_ratio"], **knobs)
    data = calibration_set(adapter, tasks, size, cfg.model.frames, True, frozenset())
    full = cfg.model.frames * 196
    kept = []
    for visual in data.visual:
        counts = torch.unique(tuned.compress(visual).groups, return_counts=True)[1]
        kept.append(sum(int(c * 0.4) for c in counts.tolist()) / full)
    # float64 means of the same per-prompt values, perhaps summed in another order
    assert result["achieved_on_calibration"] == pytest.approx(sum(kept) / len(kept),
                                                              abs=bound(torch.float64, len(kept)))
    prompt, _ = prefill(adapter, pixels_of(adapter, tasks, cfg.model.frames), tuned, use_cache=False)
    assert prompt.run.video_tokens_out / full == kept[0]  # the same count over the same total: exact


@pytest.mark.slow
def test_unreachable_retention_names_the_reachable_range(cfg_factory, adapter):
    """At the official tau = 0.8 the smoke videos are nearly all static: even cluster_ratio = 1
    keeps a few percent after llm_keep = 0.4, and retention=0.25 is a clear error."""
    from harness.data.tasks import load_tasks, prepare_task_data
    from harness.errors import ConfigError
    from harness.run.calibrate import calibrate
    from tests.helpers import choice_of, job_of

    cfg = cfg_factory("+method=prunevid", "retention=0.25")
    prepare_task_data(job_of(cfg).task)
    with pytest.raises(ConfigError, match=r"retention=0.25: unreachable.*reaches 0.00%-\d\.\d\d%"):
        calibrate(choice_of(cfg).compressor, 0.25, adapter, load_tasks(job_of(cfg).task), frames=cfg.model.frames,
                  size=cfg.task.calibration_size, identity={})


def pixels_of(adapter, tasks, frames):
    task = next(iter(tasks.values()))
    doc = task.eval_docs[0]
    p = adapter.preprocessing
    return preprocess(read_frames(task.doc_to_visual(doc)[0], frames), p.size, p.mean, p.std)


def test_label_names_cluster_ratio_and_llm_keep(cfg_factory):
    from tests.helpers import choice_of

    choice = choice_of(cfg_factory("+method=prunevid", "method.cluster_ratio=0.3"))
    assert choice.knobs["cluster_ratio"] == 0.3 and choice.label == "cluster_ratio=0.3,llm_keep=0.4"
