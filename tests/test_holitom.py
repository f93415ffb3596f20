"""HoliTom (methods/holitom.py) against its literal reference, the stock model and its golden file.

Visual stage: tests/reference/holitom.py restates the paper and the official loops in float64; the
implementation decides in float32, so inputs whose decisions lie within SAFE of flipping are
skipped (the reference reports that margin). Inner merge: the reference is the stock transformers
model (hidden states entering llm_layer via output_hidden_states, the eager attention row at
llm_layer - 1, the official sequential halving by hand in float64, then the stock forward over the
remaining layers at the kept tokens' original positions), never the decoder driver.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core import decoder
from methods.core.base import VisualInput
from methods.core.clustering import merge_into_centres
from methods.core.flops import LLMShape
from methods.holitom import (
    HoliTom,
    holitom_visual,
    inner_merge,
    temporal_windows,
    window_gains,
)
from methods.topk import pooled_scores
from tests.helpers.tolerance import close
from tests.reference.holitom import (
    reference_inner_merge,
    reference_visual,
    reference_windows,
)

GOLDEN = Path(__file__).parent / "golden" / "holitom_golden.pt"
SAFE = 1e-5
FRAMES = 4
LAYERS = 8  # the tiny smoke model
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def video(frames: int, n: int, dim: int, seed: int, still: float = 0.5):
    """Features with temporal structure (half the positions still between frames, occasional scene
    cuts, tokens around shared centroids) and random patch scores."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(max(2, n // 3), dim, generator=g, dtype=torch.float64)

    def scene():
        pick = torch.randint(0, centroids.shape[0], (n,), generator=g)
        return centroids[pick] + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)

    x, current = torch.empty(frames, n, dim, dtype=torch.float64), scene()
    for f in range(frames):
        if f and torch.rand(1, generator=g) < 0.3:
            current = scene()
        moving = (torch.rand(n, generator=g) > still)[:, None]
        step = torch.randn(n, dim, generator=g, dtype=torch.float64)
        current = current + torch.where(moving, step, 0.05 * step)
        x[f] = current
    return x.float(), torch.rand(frames, n, generator=g)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_count(x: torch.Tensor, windows, retain: float, tau: float) -> int:
    """Sum over windows of round(S·r') + L·ceil((N - S)·r'), S counted by brute force."""
    frames, n, _ = x.shape
    total = 0
    for s, e in windows:
        static = 0
        if e > s:
            for p in range(n):
                static += all(float(torch.cosine_similarity(x[t, p], x[t + 1, p], dim=0)) > tau
                              for t in range(s, e))
        total += round(static * retain) + (e - s + 1) * math.ceil((n - static) * retain)
    return total


# ---- the visual stage against the literal reference ---------------------------------------------------
SHAPES = [(1, 16, 8), (2, 16, 8), (5, 25, 16), (7, 25, 16), (8, 49, 32)]


@pytest.mark.parametrize("frames,n,dim", SHAPES)
@pytest.mark.parametrize("dominant_share", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("retention", [0.15, 0.3, 1.0])
def test_visual_stage_matches_literal_reference(frames, n, dim, dominant_share, retention):
    checked = 0
    for seed in range(30):
        x, scores = video(frames, n, dim, seed)
        ref = reference_visual(x, scores, retention, 0.8, 0.6, dominant_share, 7, seeded(seed))
        if ref.margin < SAFE:
            continue  # a decision float32 round-off may legitimately flip
        got = holitom_visual(x, scores, retention, 0.8, 0.6, dominant_share, 7, seeded(seed))
        assert got.windows == ref.windows
        assert got.retain == ref.retain
        assert got.slots.tolist() == ref.slots
        assert got.tokens.dtype == torch.float32
        # float32 against the float64 reference: a merged token sums at most a window's frames * n
        # tokens, a time mean then a cluster merge (tests/helpers/tolerance.py)
        torch.testing.assert_close(got.tokens.double(), ref.tokens, **close(torch.float32, frames * n, depth=2))
        checked += 1
        if checked == 2:
            return
    pytest.fail(f"only {checked} inputs with safe margins")


def test_visual_stage_at_full_grid_size():
    """N = 196 (the real 14x14 grid), contextual and static clustering on."""
    for seed in range(6):
        x, scores = video(4, 196, 16, seed)
        ref = reference_visual(x, scores, 0.3, 0.8, 0.6, 0.5, 7, seeded(seed))
        if ref.margin < SAFE:
            continue
        got = holitom_visual(x, scores, 0.3, 0.8, 0.6, 0.5, 7, seeded(seed))
        assert got.slots.tolist() == ref.slots and got.windows == ref.windows
        # float32 against the float64 reference: sums over at most 4 * 196 tokens, a time mean
        # then a cluster merge
        torch.testing.assert_close(got.tokens.double(), ref.tokens, **close(torch.float32, 4 * 196, depth=2))
        return
    pytest.fail("no input with safe margins")


def test_seed_changes_only_noise_decided_ties():
    # k = min(knn, clusters) = 1 (one static cluster): every density is exactly 1 and only the
    # seeded noise picks the centre, so two seeds give different centres; the same seed repeats
    x = torch.randn(1, 6, 8).repeat(2, 1, 1)
    x[1] += 1e-4 * torch.randn(6, 8)  # all positions static
    scores = torch.rand(2, 6)
    outs = {seed: holitom_visual(x, scores, 0.1, generator=seeded(seed)) for seed in range(8)}
    assert all(o.tokens.shape[0] == round(6 * min(0.1 * 12 / 6, 1)) == 1 for o in outs.values())
    assert len({tuple(o.slots.tolist()) for o in outs.values()}) > 1
    again = holitom_visual(x, scores, 0.1, generator=seeded(3))
    assert torch.equal(again.tokens, outs[3].tokens)
    for seed in range(8):
        assert outs[seed].slots.tolist() == reference_visual(x, scores, 0.1, generator=seeded(seed)).slots


# ---- windows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 3, 6, 9, 12])
def test_window_dp_equals_the_official_loop(frames):
    """Random similar/not patterns over few positions: many ties between windows."""
    g = seeded(frames)
    for trial in range(40):
        n = 1 + trial % 4
        above = torch.rand(frames - 1, n, generator=g) < (0.3 + 0.6 * (trial % 3) / 2)
        sim = above.double().tolist()  # 1.0 similar, 0.0 not; tau 0.5
        gain = window_gains(above)
        for s in range(frames):
            for e in range(frames):
                static = sum(all(sim[t][p] > 0.5 for t in range(s, e)) for p in range(n)) if e > s else 0
                assert int(gain[s, e]) == static * (e - s)
        assert temporal_windows(gain) == reference_windows(sim, frames, 0.5)


def test_window_ties_prefer_the_frame_alone_then_the_shorter_window():
    # pair (0,1) similar at position 0, pair (1,2) at position 1: [0,1] and [1,2] gain 1 each,
    # [0,2] nothing. Frame 2: alone (dp = 1) ties with [1,2] (0 + 1): the frame stays alone.
    above = torch.tensor([[True, False], [False, True]])
    assert temporal_windows(window_gains(above)) == ([(0, 1), (2, 2)], 1)
    # one position similar throughout: [0,2] (2) beats alone (1) and [1,2] (1): strictly better
    above = torch.tensor([[True], [True]])
    assert temporal_windows(window_gains(above)) == ([(0, 2)], 2)
    # frame 2: [1,2] (0 + 2 positions) ties with [0,2] (1 position x 2): the shorter window
    above = torch.tensor([[False, True], [True, True]])
    assert temporal_windows(window_gains(above)) == ([(0, 0), (1, 2)], 2)


# ---- counts and edge cases ---------------------------------------------------------------------------
@pytest.mark.parametrize("frames,n,dim,retention,tau", [
    (8, 49, 16, 0.1, 0.8), (8, 49, 16, 0.25, 0.8), (5, 196, 8, 0.15, 0.65), (3, 196, 8, 0.5, 0.9)])
def test_exact_token_counts(frames, n, dim, retention, tau):
    for seed in range(2):
        x, scores = video(frames, n, dim, seed, still=0.7)
        got = holitom_visual(x, scores, retention, tau, generator=seeded(seed))
        assert got.retain < 1
        assert got.tokens.shape[0] == expected_count(x, got.windows, got.retain, tau)
        # sum_w [S r' + L (N - S) r'] = r·F·N exactly; ceil adds, round loses < 1/2 per window
        assert got.tokens.shape[0] >= retention * frames * n - len(got.windows) / 2
        assert torch.equal(got.slots, got.slots.sort().values)  # frame-major, position order


def test_a_mostly_still_video_keeps_fewer_than_the_budget():
    # 8 frames, 45 of 49 positions still throughout: averaging alone leaves 45 + 8·4 = 77 tokens,
    # fewer than 0.25·392 = 98, so r' = min(98 / 77, 1) = 1 and all 77 are kept (official)
    x, scores = video(8, 49, 16, 5, still=1.0)
    x[:, 45:] = torch.randn(8, 4, 16, generator=seeded(1))
    got = holitom_visual(x, scores, 0.25, generator=seeded(0))
    assert got.windows == [(0, 7)] and got.retain == 1
    assert got.tokens.shape[0] == 77 == expected_count(x, got.windows, 1, 0.8)


def test_single_frame_keeps_the_top_scored_tokens_in_order():
    x, scores = video(1, 196, 8, 0)
    got = holitom_visual(x, scores, 0.25)
    k = math.ceil(196 * 0.25)
    expected = sorted(sorted(range(196), key=lambda p: (-float(scores[0, p]), p))[:k])
    assert got.windows == [(0, 0)] and got.slots.tolist() == expected
    assert torch.equal(got.tokens, x[0, expected])


def test_identical_tokens_collapse_to_the_static_budget():
    v = torch.randn(32)
    x = v.expand(6, 49, 32).clone()
    got = holitom_visual(x, torch.rand(6, 49), 0.1, generator=seeded(0))
    # one window, every position static: r' = min(0.1·6·49 / 49, 1) = 0.6, round(49·0.6) = 29
    assert got.windows == [(0, 5)] and got.retain == pytest.approx(0.6)
    assert got.tokens.shape == (29, 32) and (got.slots < 49).all()  # all in the first frame
    # float32 means of copies of v against v itself: a time mean over 6 frames, then cluster
    # merges, at most 6 * 49 copies summed
    torch.testing.assert_close(got.tokens, v.expand(29, 32), **close(torch.float32, 6 * 49, depth=2))


def test_static_tokens_are_dropped_when_their_budget_rounds_to_zero():
    x, scores = video(2, 16, 8, 1)
    x[1] = -x[0]  # cos -1: nothing static ...
    x[1, 0] = x[0, 0] * 1.01  # ... but position 0
    got = holitom_visual(x, scores, 0.2, generator=seeded(0))
    assert got.windows == [(0, 1)]
    retain = 0.2 / ((32 - 1) / 32)
    assert got.retain == retain and round(1 * retain) == 0
    assert got.tokens.shape[0] == 2 * math.ceil(15 * retain)
    assert 0 not in got.slots.tolist() and 16 not in got.slots.tolist()


@pytest.mark.parametrize("dominant_share", [1.0, 0.3, 0.0])
def test_retention_one_without_static_positions_is_the_identity(dominant_share):
    x, scores = video(5, 49, 16, 2, still=0.9)
    got = holitom_visual(x, scores, 1.0, tau=1.5, dominant_share=dominant_share, generator=seeded(0))
    assert torch.equal(got.tokens, x.flatten(0, 1))
    # with tau = 0.8 the still positions are averaged over time even at retention 1
    assert holitom_visual(x, scores, 1.0, tau=0.8).tokens.shape[0] < 5 * 49


def test_bfloat16_input_decides_in_float32():
    x, scores = video(6, 49, 16, 3)
    x = x.bfloat16()
    got = holitom_visual(x, scores, 0.25, dominant_share=0.5, generator=seeded(0))
    same = holitom_visual(x.float(), scores, 0.25, dominant_share=0.5, generator=seeded(0))
    assert got.tokens.dtype == torch.bfloat16 and torch.equal(got.slots, same.slots)
    assert torch.equal(got.tokens, same.tokens.bfloat16())


def test_input_is_not_modified():
    x, scores = video(4, 25, 8, 4)
    before = x.clone(), scores.clone()
    holitom_visual(x, scores, 0.3, dominant_share=0.5, generator=seeded(0))
    assert torch.equal(x, before[0]) and torch.equal(scores, before[1])


def test_merge_into_centres_weights_centre_and_members():
    x = torch.tensor([[[0.0], [2.0], [4.0], [10.0], [7.0]]])
    centres = torch.tensor([[1, 3]])
    label = torch.tensor([[0, 0, 0, 1, 0]])  # token 4 joins centre 1 (index 0 into centres)
    out = merge_into_centres(x, label, centres, 0.6)
    # float32 against the arithmetic by hand: a mean of 3 members, then a weighted sum of 2 terms
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.6 * 2 + 0.4 * (0 + 4 + 7) / 3, 10.0]),
                               **close(torch.float32, 3, depth=2))
    fastvid = merge_into_centres(x, label, centres, lambda count: (1 / (count + 1)).clamp(min=0.5))
    torch.testing.assert_close(fastvid[0, :, 0], torch.tensor([0.5 * 2 + 0.5 * 11 / 3, 10.0]),
                               **close(torch.float32, 3, depth=2))


# ---- the inner merge (pure) ------------------------------------------------------------------------------
@pytest.mark.parametrize("video_tokens, keep", [(40, 0.5), (41, 0.3), (7, 0.9), (300, 0.5)])
def test_inner_merge_equals_the_sequential_halving(video_tokens, keep):
    g = seeded(video_tokens)
    # few directions: kept tokens collect many members (weights down to 2^-m)
    hidden = torch.randn(5, 24, generator=g)[torch.randint(0, 5, (video_tokens,), generator=g)]
    hidden = hidden + 0.3 * torch.randn(video_tokens, 24, generator=g)
    scores = torch.rand(video_tokens, generator=g)
    ref = reference_inner_merge(hidden, scores, keep)
    assert ref.margin > SAFE
    kept = torch.tensor(ref.kept)
    # float32 weighted sums against the float64 sequential halving: a kept token sums at most
    # all video_tokens states (weights 2^-m are exact)
    torch.testing.assert_close(inner_merge(hidden, kept).double(), ref.states, **close(torch.float32, video_tokens))


def test_inner_merge_of_identical_tokens_goes_to_the_lower_position():
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    # kept 1 and 2 are equally similar (cos 1) to 0: the lower position (1) takes it
    out = inner_merge(hidden, torch.tensor([1, 2, 3]))
    # halves of small integers: every step is exact in float32, in any order
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 2.0]]), rtol=0, atol=0)


# ---- knobs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"retention": 0.0}, r"holitom.retention=0.0: expected a value in \(0.0, 1.0\]"),
    ({"retention": 1.5}, "holitom.retention=1.5"),
    ({"tau": -1.5}, r"holitom.tau=-1.5: expected a value in \[-1.0, 1.0\]"),
    ({"tau": 2}, r"holitom.tau=2: expected a value in \[-1.0, 1.0\]"),
    ({"beta": 1.2}, "holitom.beta=1.2"), ({"dominant_share": -0.1}, "holitom.dominant_share=-0.1"),
    ({"knn": 0}, "holitom.knn=0"), ({"knn": 2.5}, "holitom.knn=2.5"),
    ({"llm_layer": 0}, "holitom.llm_layer=0"), ({"llm_layer": "x"}, "holitom.llm_layer='x'"),
    ({"llm_keep": 0.0}, r"holitom.llm_keep=0.0: expected a value in \(0.0, 1.0\]"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("holitom", **knobs)


def test_llm_layer_defaults_to_the_official_layer_scaled():
    assert [LLMShape(0, 0, d).scaled_layer(18) for d in (28, 24, 8, 2)] == [18, 15, 5, 1]
    assert HoliTom().prefill_policy(LLMShape(64, 128, 28)).layer == 18
    assert HoliTom(llm_layer=3).prefill_policy(LLMShape(64, 128, 8)).layer == 3
    with pytest.raises(ValueError, match=r"holitom.llm_layer=8: expected a layer in \[1, 7\]"):
        HoliTom(llm_layer=8).prefill_policy(LLMShape(64, 128, 8))


def test_planned_counts():
    policy = HoliTom(llm_keep=0.5).prefill_policy(LLMShape(64, 128, 28))
    assert policy.planned(1001) == [1001] * 18 + [500] * 10  # round half to even
    assert HoliTom(llm_keep=1.0).prefill_policy(LLMShape(64, 128, 8)).planned(77) == [77] * 8
    assert HoliTom(llm_keep=1e-6).prefill_policy(LLMShape(64, 128, 8)).planned(77) == [77] * 5 + [1] * 3


def test_config_sets_retention_directly(cfg_factory):
    from tests.helpers import choice_of

    choice = choice_of(cfg_factory("+method=holitom", "retention=0.1", "tau=0.65"))
    assert choice.target_retention is None  # direct: no calibration
    assert choice.knobs["retention"] == 0.1 and choice.knobs["tau"] == 0.65
    assert choice.label == "r=0.1,tau=0.65,llm_keep=0.5"
    assert choice_of(cfg_factory("+method=holitom")).knobs == {
        "retention": 0.25, "tau": 0.8, "beta": 0.6, "dominant_share": 1.0, "knn": 7,
        "llm_layer": None, "llm_keep": 0.5}


# ---- golden ------------------------------------------------------------------------------------------------
def test_golden():
    data = torch.load(GOLDEN)
    got = holitom_visual(data["features"].float(), data["scores"], generator=seeded(data["seed"]),
                         **data["knobs"])
    assert got.windows == [tuple(w) for w in data["windows"]]
    assert got.slots.tolist() == data["slots"].tolist()
    # float32 here against float32 on the CPU that wrote the file (its own summation order): a
    # merged token sums at most all frames * N tokens, a time mean then a cluster merge
    frames, n, _ = data["features"].shape
    torch.testing.assert_close(got.tokens, data["tokens"], **close(torch.float32, frames * n, depth=2))
    merged = inner_merge(data["hidden"].float(), data["kept"])
    # likewise: a kept token's weighted sum over at most all 40 states
    torch.testing.assert_close(merged, data["merged"], **close(torch.float32, data["hidden"].shape[0]))


# ---- on the tiny model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", FRAMES),
                      p.size, p.mean, p.std)


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None]


def stock_logits(adapter, embeds, positions, layers=None):
    """The stock Qwen2 forward on `embeds` at `positions` (over a slice of its layers) + the head."""
    lm = adapter.model.model.language_model
    full, depth = lm.layers, lm.config.num_hidden_layers
    if layers is not None:
        lm.layers = torch.nn.ModuleList(list(full)[layers])
        lm.config.num_hidden_layers = len(lm.layers)
    try:
        with torch.no_grad():
            hidden = lm(inputs_embeds=embeds, position_ids=positions, attention_mask=causal(embeds.shape[1]),
                        use_cache=False).last_hidden_state
    finally:
        lm.layers, lm.config.num_hidden_layers = full, depth
    return adapter.model.lm_head(hidden)


def stock_merge_reference(adapter, eager, embeds, span, layer, keep):
    """The kept prompt indices and the states entering `layer` after the official merge, from the
    stock model: hidden_states[layer] of a full forward, the eager attention row at layer-1."""
    start, end = span
    lm = adapter.model.model.language_model
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
        row = eager.model(inputs_embeds=embeds, output_attentions=True).attentions[layer - 1][0, :, -1].mean(0)
    ref = reference_inner_merge(hidden[0, start:end], row[start:end], keep)
    kept = torch.cat([torch.arange(start), torch.tensor(ref.kept) + start, torch.arange(end, embeds.shape[1])])
    states = hidden[:, kept].clone()
    states[0, start:start + len(ref.kept)] = ref.states.float()
    return kept, states, ref


@pytest.mark.parametrize("layer, keep", [(None, 0.5), (1, 0.3), (7, 0.5)])
@pytest.mark.slow
def test_inner_merge_matches_the_stock_model_merged_by_hand(adapter, eager, pixels, layer, keep):
    method = HoliTom(retention=0.5, llm_layer=layer, llm_keep=keep)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, method, ids)
    out = adapter.prefill(prompt, method, use_cache=True)
    K = LLMShape(0, 0, LAYERS).scaled_layer(18) if layer is None else layer
    kept, states, ref = stock_merge_reference(adapter, eager, prompt.embeds, prompt.span, K, keep)
    # the random model's attention has near-ties (the cut is 3e-8..1e-7 wide here), far wider than
    # the ~5e-10 by which the eager row and the driver's recomputed row differ
    assert ref.margin > 1e-8
    assert out.kept.tolist() == kept.tolist()
    expected = stock_logits(adapter, states, kept[None], slice(K, None))
    # the driver's merged prefill against the stock forward merged by hand: attention sums over
    # the prompt's keys, in each of LAYERS layers (tests/helpers/tolerance.py)
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, prompt.embeds.shape[1], depth=LAYERS))
    video = prompt.span[1] - prompt.span[0]
    assert prompt.run.layer_video_tokens == [video] * K + [round(video * keep)] * (LAYERS - K)
    assert prompt.run.layer_video_tokens == method.prefill_policy(adapter.llm.shape).planned(video)
    assert prompt.run.video_tokens_out == round(video * keep)  # what rho_tok counts
    assert [l.keys.shape[-2] for l in out.state.cache.layers] == (
        [prompt.embeds.shape[1]] * K + [len(kept)] * (LAYERS - K))


def test_cached_decode_equals_an_uncached_reference(adapter, eager, pixels, monkeypatch):
    """Each decode step equals the stock model run without cache on prompt + generated tokens:
    layers < K over everything, then, from the merged states entering K, layers >= K over the kept
    prompt tokens and the generated ones, all at their original positions."""
    K, keep = 4, 0.5
    method = HoliTom(retention=0.4, llm_layer=K, llm_keep=keep)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, method, ids)
    # the reference starts from the driver's own merge (its kept set and merged states entering K):
    # this test is about the cache and the positions after the merge, not about the merge's
    # decisions, whose near-ties (cosine margins ~1e-7 on these near-still clips) float32 resolves
    # differently on other CPUs; test_inner_merge_matches_the_stock_model_merged_by_hand checks those
    seen = {}
    policy = method.prefill_policy(adapter.llm_shape)
    act = policy.act

    def recording(view):
        decision = act(view)
        seen.update(hidden=view.hidden.clone(), video=view.video.clone(), keep=decision)
        return decision

    policy.act = recording
    monkeypatch.setattr(HoliTom, "prefill_policy", lambda self, llm: policy)
    out = adapter.prefill(prompt, method, use_cache=True)
    embeds, total = prompt.embeds, prompt.embeds.shape[1]
    start, end = prompt.span
    kept = torch.cat([torch.arange(start), seen["keep"].video + start, torch.arange(end, total)])
    merged = seen["hidden"][:, kept].clone()
    merged[0, start:start + len(seen["keep"].video)] = seen["keep"].hidden
    assert out.kept.tolist() == kept.tolist()
    embed = adapter.model.get_input_embeddings()
    lm = adapter.model.model.language_model
    logits, tokens = out.logits[0, -1], []
    for step in range(5):
        token = int(logits.argmax())
        tokens.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
        with torch.no_grad():
            logits = decoder.decode(adapter.llm, out.state, torch.tensor([[token]]))[0, -1]
            hidden = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[K]
        generated = torch.arange(total, total + step + 1)
        states = torch.cat([merged, hidden[:, generated]], 1)
        expected = stock_logits(adapter, states, torch.cat([kept, generated])[None], slice(K, None))[0, -1]
        # cached decode against an uncached stock recompute: attention sums over at most
        # total + step + 1 keys, in each of LAYERS layers (tests/helpers/tolerance.py)
        torch.testing.assert_close(logits, expected, **close(torch.float32, total + step + 1, depth=LAYERS))
    assert [l.keys.shape[-2] for l in out.state.cache.layers] == (
        [total + 5] * K + [len(kept) + 5] * (LAYERS - K))


def test_retention_one_without_merging_reproduces_none(adapter, pixels):
    none = methods.build("none")
    method = HoliTom(retention=1.0, tau=1.0, llm_keep=1.0)  # cos > 1 never holds: nothing static
    ids, _ = adapter.prompt_ids(QUESTION)
    ours, ref = adapter.prepare(pixels, method, ids), adapter.prepare(pixels, none, ids)
    assert torch.equal(ours.embeds, ref.embeds)
    a = adapter.prefill(ours, method, use_cache=False).logits
    b = adapter.prefill(ref, none, use_cache=False).logits
    assert torch.equal(a, b)
    assert ours.run.layer_video_tokens == [FRAMES * 196] * LAYERS


@pytest.mark.slow
def test_visual_stage_on_real_features_and_generation(adapter, pixels):
    encoded = adapter.encode_video(pixels, HoliTom.needs)
    visual = encoded.visual
    method = HoliTom(retention=0.25)
    scores = pooled_scores(visual.patch_scores, visual.grid)
    tokens = method.compress(VisualInput(visual.features, visual.grid, visual.patch_scores))
    got = holitom_visual(visual.features, scores, 0.25, generator=seeded(0))
    assert torch.equal(tokens, got.tokens)
    assert tokens.shape[0] == expected_count(visual.features, got.windows, got.retain, 0.8)
    ref = reference_visual(visual.features, scores, 0.25, generator=seeded(0))
    if ref.margin >= SAFE:
        assert got.slots.tolist() == ref.slots
        # float32 against the float64 reference: sums over at most all frames * N tokens, a time
        # mean then a cluster merge
        frames, n, _ = visual.features.shape
        torch.testing.assert_close(got.tokens.double(), ref.tokens, **close(torch.float32, frames * n, depth=2))
    text, run = adapter.generate(pixels, QUESTION, method, max_new_tokens=4)
    K = LLMShape(0, 0, LAYERS).scaled_layer(18)
    assert run.layer_video_tokens == [tokens.shape[0]] * K + [round(tokens.shape[0] / 2)] * (LAYERS - K)
    assert {"vision", "compressor", "prefill", "decode"} <= set(run.timings)
    assert run.timings["compressor"] > 0
