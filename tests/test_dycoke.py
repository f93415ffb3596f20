"""DyCoke (methods/dycoke.py): both stages against literal references.

The visual stage is compared with tests/reference/dycoke.py (loops, float64). The decode stage is
compared with the stock model run without a cache: at every generated token the reference takes
the eager attention of layer L-1, runs the literal selection (ReferenceSelection) on it, and hides
the unselected video entries from that token's row in layers >= L (a 4-D mask), as in
tests/test_decoder.py::test_decode_policy_hides_entries_from_its_layer_on.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core import decoder
from methods.core.base import VisualInput
from methods.dycoke import (
    DyCoke,
    DynamicKVSelection,
    decode_layer,
    dycoke_merge,
    kept_per_frame,
    merged_count,
    select_video_entries,
)
from tests.helpers.tolerance import close
from tests.reference.dycoke import ReferenceSelection, literal_cosine, reference_ttm

FRAMES = 4
LAYERS = 8  # decoder layers of the tiny smoke model
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


def features(frames: int, per_frame: int = 196, dim: int = 32, seed: int = 0, dtype=torch.float64,
             drift: float = 0.5) -> torch.Tensor:
    """Frames that drift from a common base: same-position similarities spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(per_frame, dim, generator=g, dtype=torch.float64)
    scale = drift * torch.rand(frames, per_frame, 1, generator=g, dtype=torch.float64) * 3
    x = base + scale * torch.randn(frames, per_frame, dim, generator=g, dtype=torch.float64)
    return x.to(dtype)


# ---- visual stage: temporal token merging ---------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13])
@pytest.mark.parametrize("merge_ratio", [0.7, 0.3, 0.5, 0.9, 1.0])
def test_merge_equals_the_literal_reference(frames, merge_ratio):
    x = features(frames, seed=frames)
    ref = reference_ttm(x, merge_ratio)
    assert ref.margin > 1e-9, "input too close to a tie"
    y = dycoke_merge(x, merge_ratio)
    assert y.dtype == torch.float64
    assert torch.equal(y, ref.output)  # the same rows, copied
    assert y.shape[0] == merged_count(frames, 196, merge_ratio)


@pytest.mark.parametrize("frames", [2, 5, 8, 32])
def test_merge_in_float32_equals_the_reference(frames):
    x = features(frames, dim=64, seed=100 + frames, dtype=torch.float32)
    ref = reference_ttm(x, 0.7)
    assert ref.margin > 1e-5, "a decision float32 round-off may flip"
    y = dycoke_merge(x, 0.7)
    assert y.dtype == torch.float32
    assert torch.equal(y.double(), ref.output)


def test_small_grids_and_odd_sizes():
    for frames, per_frame in [(3, 1), (5, 7), (6, 49)]:
        x = features(frames, per_frame, dim=8, seed=frames * per_frame)
        for k in (0.0, 0.25, 0.6, 1.0):
            ref = reference_ttm(x, k)
            assert torch.equal(dycoke_merge(x, k), ref.output)


@pytest.mark.parametrize("frames, expected", [
    (1, 196), (2, 196 + 58), (3, 196 + 2 * 58), (4, 196 + 3 * 58), (5, 2 * 196 + 3 * 58),
    (8, 2 * 196 + 6 * 58), (32, 2960),  # official loop: 3098 at F = 32 (the last window skipped)
])
def test_exact_token_counts_at_the_defaults(frames, expected):
    assert kept_per_frame(0.7, 196) == 58  # int(0.30000000000000004 * 196) = int(58.8)
    assert merged_count(frames, 196, 0.7) == expected
    y = DyCoke().compress(VisualInput(features(frames, dim=8, seed=1, dtype=torch.float32), (14, 14)))
    assert y.shape == (expected, 8)


def test_token_counts_for_every_frame_count_and_ratio():
    for frames in range(1, 34):
        for k in (0.0, 0.1, 0.3, 0.5, 0.7, 0.75, 0.99, 1.0):
            keep = int((1 - k) * 196)
            full = len(range(0, frames, 4))  # frames 0, 4, 8, ...: no partner
            assert merged_count(frames, 196, k) == full * 196 + (frames - full) * keep


def test_which_frames_are_reduced_against_which():
    """Frame 2j+1 against frame 2j, frame 4j+2 against frame 4j, frames 4j whole (F = 7)."""
    frames, n = 7, 6
    x = torch.randn(frames, n, 4, dtype=torch.float64)
    # frame f equals its partner except at position f % n (cosine -1 there): that token is kept;
    # frames 2 and 6 first, as they are the partners of 3 and 7
    for f, partner in [(2, 0), (6, 4), (1, 0), (3, 2), (5, 4)]:
        x[f] = x[partner]
        x[f, f % n] = -x[partner, f % n]
    y = dycoke_merge(x, 0.8)  # keep int(0.2 * 6) = 1 token per reduced frame
    rows = [x[0, i] for i in range(n)] + [x[1, 1], x[2, 2], x[3, 3]] + [x[4, i] for i in range(n)] + [
        x[5, 5], x[6, 0]]
    assert torch.equal(y, torch.stack(rows))


def test_kept_tokens_stay_in_grid_order_and_ties_go_to_lower_positions():
    x = torch.randn(2, 10, 4)
    x[1] = x[0]
    x[1, [7, 2, 5]] *= -1  # three dissimilar tokens: kept, in grid order
    y = dycoke_merge(x, 0.7)  # keep int(0.3 * 10) = 3 (0.30000000000000004 * 10 = 3.0000000000000004)
    assert torch.equal(y[10:], x[1, [2, 5, 7]])
    same = torch.ones(2, 10, 4) * torch.arange(1.0, 11.0)[None, :, None]  # every similarity 1
    assert torch.equal(dycoke_merge(same, 0.5)[10:], same[1, :5])  # the lowest positions win


def test_identical_and_zero_tokens():
    v = torch.randn(16)
    x = v.expand(4, 196, 16).clone()
    y = dycoke_merge(x, 0.7)
    assert y.shape == (196 + 3 * 58, 16) and torch.equal(y, v.expand_as(y))
    x = features(3, dim=8, seed=3)
    x[1, :20] = 0  # zero tokens have cosine 0 with their partner: among the least similar
    ref = reference_ttm(x, 0.5)
    assert torch.equal(dycoke_merge(x, 0.5), ref.output)
    assert set(range(20)) <= set(ref.kept[1])


def test_merge_ratio_zero_keeps_every_token_and_one_keeps_only_whole_frames():
    x = features(6, dim=8, seed=4, dtype=torch.float32)
    assert torch.equal(dycoke_merge(x, 0.0), x.flatten(0, 1))
    assert torch.equal(dycoke_merge(x, 1.0), torch.cat([x[0], x[4]]))


def test_half_precision_decides_in_float32():
    x = features(5, dim=32, seed=5, dtype=torch.float32).bfloat16()
    y = dycoke_merge(x, 0.7)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, dycoke_merge(x.float(), 0.7).bfloat16())
    x = features(3, seed=6)
    before = x.clone()
    dycoke_merge(x, 0.7)
    assert torch.equal(x, before)  # input untouched


# ---- knobs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"merge_ratio": 1.5}, r"dycoke.merge_ratio=1.5: expected a value in \[0.0, 1.0\]"),
    ({"merge_ratio": -0.1}, "dycoke.merge_ratio=-0.1"),
    ({"merge_ratio": float("nan")}, "dycoke.merge_ratio=nan"),
    ({"merge_ratio": "high"}, "dycoke.merge_ratio='high': expected a number"),
    ({"prune_ratio": 1.01}, r"dycoke.prune_ratio=1.01: expected a value in \[0.0, 1.0\]"),
    ({"prune_ratio": True}, "dycoke.prune_ratio=True"),
    ({"reprune_threshold": 1.5}, r"dycoke.reprune_threshold=1.5: expected a value in \[-1.0, 1.0\]"),
    ({"reprune_threshold": float("nan")}, "dycoke.reprune_threshold=nan"),
    ({"layer": 0}, r"dycoke.layer=0: expected an integer in \[1, inf\]"),
    ({"layer": 2.0}, "dycoke.layer=2.0: expected an integer"),
    ({"tau": 0.9}, "method 'dycoke' has no knob tau"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("dycoke", **knobs)


def test_default_layer_is_the_official_one_scaled_to_the_depth():
    assert decode_layer(None, 28) == 3  # LLaVA-OV-7B: the official L = 3
    assert decode_layer(None, 24) == 3  # 0.5B: round(2.57)
    assert decode_layer(None, LAYERS) == 1  # the tiny model: round(0.86)
    assert decode_layer(None, 2) == 1 and decode_layer(None, 100) == 11
    assert decode_layer(5, 28) == 5
    with pytest.raises(ValueError, match=r"dycoke.layer=8: expected a layer in \[1, 7\] for an LLM of 8 layers"):
        DyCoke(layer=8).decode_policy(methods.core.flops.LLMShape(64, 128, 8))
    with pytest.raises(ValueError, match="1 layer"):
        decode_layer(None, 1)
    policy = DyCoke(prune_ratio=0.6, reprune_threshold=0.8).decode_policy(methods.core.flops.LLMShape(64, 128, 28))
    assert (policy.layer, policy.prune_ratio, policy.threshold) == (3, 0.6, 0.8)


# ---- decode stage: the selection on controlled attention sequences -----------------------------------
class FakeView:
    """A decode view with a given attention at layer L-1 over 2 text + V video + 1 text entries
    (+ the token itself); records the layers asked."""

    def __init__(self, video_attention, layer):
        v = len(video_attention)
        self.layer, self.asked = layer, []
        self.video = torch.arange(2, 2 + v)
        self.row = torch.cat([torch.tensor([0.3, 0.1]), torch.as_tensor(video_attention, dtype=torch.float32),
                              torch.tensor([0.2, 0.4])])

    def attention(self, layer=None):
        self.asked.append(self.layer if layer is None else layer)
        return self.row


def unit(*values):
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.sum()


def test_selection_is_reused_while_similar_to_the_selecting_step_and_recomputed_otherwise():
    """P = 0.5 over 4 entries: 2 kept. The cosine with the SELECTING step decides (spec), not the
    one with the previous step (official): a2 is close to a1 (0.98) but not to a0 (0.87), the
    step whose selection a1 reused, so a2 re-selects."""
    def cos(a, b):
        return literal_cosine(a.tolist(), b.tolist())

    a0 = unit(4, 3, 1, 1)  # top-2: {0, 1}
    a1 = unit(3.6, 3.2, 3.4, 1)  # cos(a1, a0) = 0.914: reuse {0, 1}, though its own top-2 is {0, 2}
    a2 = unit(3.0, 3.0, 3.5, 2.0)  # cos(a2, a0) = 0.871: re-select {2, and of the tie 0/1: 0}
    a3 = unit(1.5, 3.0, 3.5, 2.5)  # cos(a3, a2) = 0.963: reuse {0, 2}, though its top-2 is {1, 2}
    a4 = unit(1, 1, 1, 4)  # cos(a4, a2) = 0.686: re-select {3, and of the tie 0/1/2: 0}
    assert cos(a1, a0) >= 0.9 > cos(a2, a0) and cos(a2, a1) >= 0.9  # previous-step rule: reuse
    assert cos(a3, a2) >= 0.9 > cos(a4, a2)
    policy = DynamicKVSelection(layer=3, prune_ratio=0.5, threshold=0.9)
    expected = [[0, 1], [0, 1], [0, 2], [0, 2], [0, 3]]
    reference = ReferenceSelection(0.5, 0.9)
    for a, kept in zip([a0, a1, a2, a3, a4], expected):
        view = FakeView(a, layer=3)
        chosen = policy.select(view)
        assert chosen.dtype == torch.bool and chosen.nonzero().flatten().tolist() == kept
        assert reference.step(a.tolist()) == kept
        assert 2 in view.asked  # the attention of layer L-1
    assert [bool(r) for r in policy.reselected] == [True, False, True, False, True] == reference.history
    assert torch.equal(policy.anchor, a4)  # the attention of the last selecting step


def test_threshold_edges():
    seq = [unit(4, 3, 1, 1), unit(3.6, 3.2, 3.4, 1), unit(1, 1, 1, 4)]
    never = DynamicKVSelection(3, 0.5, -1.0)  # cos >= -1 always: the first selection forever
    always = DynamicKVSelection(3, 0.5, 1.0)  # cos < 1 unless identical: re-select every step
    for a, top in zip(seq, [[0, 1], [0, 2], [0, 3]]):  # each step's own top-2 (ties: lower index)
        assert never.select(FakeView(a, 3)).nonzero().flatten().tolist() == [0, 1]
        assert always.select(FakeView(a, 3)).nonzero().flatten().tolist() == top
    same = DynamicKVSelection(3, 0.5, 1.0)
    for _ in range(3):
        same.select(FakeView(seq[0], 3))
    assert [bool(r) for r in same.reselected] == [True, False, False]  # cos = 1 >= 1: reused


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.97, 0.995])
@pytest.mark.parametrize("prune_ratio", [0.3, 0.7, 0.9, 1.0])
def test_selection_equals_the_literal_reference_on_a_random_walk(threshold, prune_ratio):
    g = torch.Generator().manual_seed(int(threshold * 1000) + int(prune_ratio * 100))
    logits = torch.randn(97, generator=g)
    policy = DynamicKVSelection(5, prune_ratio, threshold)
    reference = ReferenceSelection(prune_ratio, threshold)
    for _ in range(40):
        logits = logits + 0.1 * torch.randn(97, generator=g)
        a = logits.softmax(0)
        chosen = policy.select(FakeView(a, 5))
        assert chosen.nonzero().flatten().tolist() == reference.step(a.tolist())
        assert int(chosen.sum()) == int(97 * (1 - prune_ratio))
    assert [bool(r) for r in policy.reselected] == reference.history
    assert min(abs(c - threshold) for c in reference.cosines) > 1e-6
    if threshold >= 0.97:
        assert 1 < sum(reference.history) < 40  # both reuse and re-selection happened


def test_nothing_hidden_returns_none_and_everything_hidden_keeps_only_text():
    a = unit(1, 2, 3, 4)
    view = FakeView(a, 3)
    assert DynamicKVSelection(3, 0.0, 0.9).select(view) is None and view.asked == []
    assert DynamicKVSelection(3, 0.1, 0.9).select(FakeView(a, 3)).tolist() == [False, True, True, True]
    assert not DynamicKVSelection(3, 1.0, 0.9).select(FakeView(a, 3)).any()
    empty = FakeView([], 3)  # no video entries: nothing to select
    assert DynamicKVSelection(3, 0.5, 0.9).select(empty) is None


def test_pure_selection_function():
    a, b = unit(1, 5, 2, 4), unit(1, 4, 5, 2)  # cos(a, b) = 0.848
    sel, anchor, again = select_video_entries(a, 2, None, None, 0.9)
    assert sel.tolist() == [False, True, False, True] and again.ndim == 0 and bool(again)
    kept, same, again = select_video_entries(b, 2, sel, anchor, 0.8)  # 0.848 >= 0.8: reuse
    assert not bool(again) and torch.equal(kept, sel) and torch.equal(same, a)
    fresh, new, again = select_video_entries(b, 2, sel, anchor, 0.9)  # 0.848 < 0.9: re-select
    assert bool(again) and fresh.tolist() == [False, True, True, False] and torch.equal(new, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu_without_host_synchronisation():
    x = features(8, dim=64, seed=9, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    steps = [torch.randn(300, generator=g).softmax(0) for _ in range(3)]
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        y = dycoke_merge(x.cuda(), 0.7)
        selected = anchor = None
        for a in steps:
            selected, anchor, _ = select_video_entries(a.cuda(), 90, selected, anchor, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(y.cpu(), dycoke_merge(x, 0.7))
    selected_cpu = anchor_cpu = None
    for a in steps:
        selected_cpu, anchor_cpu, _ = select_video_entries(a, 90, selected_cpu, anchor_cpu, 0.99)
    assert torch.equal(selected.cpu(), selected_cpu)


# ---- on the tiny model ------------------------------------------------------------------------------
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
    return torch.ones(n, n, dtype=torch.bool).tril()


def reference_decode(adapter, eager, embeds, span, layer, prune_ratio, threshold, steps):
    """Greedy decoding without a cache: per step, the literal selection on the eager attention of
    layer L-1 (its row is never masked: layers < L see everything), then the stock forward with
    each generated token's row hiding its unselected video entries in layers >= L."""
    start, end = span
    lm = adapter.model.model.language_model
    embed = adapter.model.get_input_embeddings()
    selection = ReferenceSelection(prune_ratio, threshold)
    with torch.no_grad():
        logits = adapter.model(inputs_embeds=embeds).logits[0, -1]
    mask = causal(embeds.shape[1])
    tokens, step_logits = [], []
    for _ in range(steps):
        token = int(logits.argmax())
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
            n = embeds.shape[1]
            weights = eager.model(inputs_embeds=embeds, output_attentions=True).attentions[layer - 1]
        chosen = selection.step(weights[0, :, -1].mean(0)[start:end].tolist())
        grown = causal(n)
        grown[:-1, :-1] = mask
        hidden = sorted(set(range(end - start)) - set(chosen))
        grown[n - 1, [start + i for i in hidden]] = False
        mask = grown

        masks = {True: mask[None, None], False: causal(n)[None, None]}

        def hook(module, args, kwargs, masks=masks):
            kwargs["attention_mask"] = masks[module.self_attn.layer_idx >= layer]
            return args, kwargs

        handles = [l.register_forward_pre_hook(hook, with_kwargs=True) for l in lm.layers]
        try:
            with torch.no_grad():
                hidden_states = lm(inputs_embeds=embeds, position_ids=torch.arange(n)[None],
                                   attention_mask=causal(n)[None, None], use_cache=False).last_hidden_state
                logits = adapter.model.lm_head(hidden_states)[0, -1]
        finally:
            for h in handles:
                h.remove()
        step_logits.append(logits)
    return tokens, step_logits, selection


@pytest.mark.parametrize("layer, prune_ratio, threshold", [
    (1, 0.6, 0.9),  # the tiny model's default layer; attention barely moves: selection reused
    (1, 0.6, 0.99999),  # re-selected when the drift from the selecting step passes 1e-5
    (3, 0.3, 1.0),  # re-selected at every step
    (6, 0.8, 0.99998),
])
@pytest.mark.slow
def test_cached_decode_equals_the_uncached_masked_reference(adapter, eager, pixels, layer, prune_ratio,
                                                            threshold):
    steps = 6
    compressor = DyCoke(merge_ratio=0.5, layer=layer, prune_ratio=prune_ratio, reprune_threshold=threshold)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    videos = prompt.span[1] - prompt.span[0]
    assert videos == merged_count(FRAMES, 196, 0.5)
    out = adapter.prefill(prompt, compressor, use_cache=True)
    with torch.no_grad():  # the prefill is not pruned: the stock layers on the same inputs in the
        # same order (the driver with `none` is the stock model exactly, tests/test_model.py): exact
        torch.testing.assert_close(out.logits, adapter.model(inputs_embeds=prompt.embeds).logits,
                                   rtol=0, atol=0)
    tokens, expected, selection = reference_decode(adapter, eager, prompt.embeds, prompt.span, layer,
                                                   prune_ratio, threshold, steps)
    assert min(selection.margins) > 1e-9, "a top-k decision too close to a tie"
    assert all(abs(c - threshold) > 1e-6 for c in selection.cosines), "a cosine too close to the threshold"
    policy = compressor.decode_policy(adapter.llm.shape)
    assert policy.layer == layer
    token = out.logits[0, -1].argmax().view(1, 1)
    for step in range(steps):
        assert int(token) == tokens[step]
        logits = decoder.decode(adapter.llm, out.state, token, policy)
        # cached, masked decode against the uncached masked stock recompute: attention sums over
        # the prompt's keys and the step's, in each of LAYERS layers (tests/helpers/tolerance.py)
        keys = prompt.embeds.shape[1] + step + 1
        torch.testing.assert_close(logits[0, -1], expected[step], **close(torch.float32, keys, depth=LAYERS))
        token = logits[0, -1].argmax().view(1, 1)
    assert [bool(r) for r in policy.reselected] == selection.history
    if threshold == 0.9:
        assert selection.history == [True] + [False] * (steps - 1)
    elif threshold == 1.0:
        assert all(selection.history)
    else:
        assert 1 < sum(selection.history) < steps  # both reuse and re-selection exercised
    keep = int(videos * (1 - prune_ratio))
    assert out.state.decode_video_visible == pytest.approx([keep / videos] * steps)
    # the cache is masked, not truncated: every layer holds every entry
    assert [l.keys.shape[-2] for l in out.state.cache.layers] == [prompt.embeds.shape[1] + steps] * LAYERS


def test_generation_through_the_adapter_decodes_several_tokens(adapter, pixels):
    compressor = DyCoke(merge_ratio=0.7, prune_ratio=0.7)
    text, run = adapter.generate(pixels, QUESTION, compressor, max_new_tokens=6)
    ids = adapter.tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 6  # the random model does not stop: 1 token from the prefill, 5 decode steps
    videos = merged_count(FRAMES, 196, 0.7)
    assert run.video_tokens_out == videos == run.layer_video_tokens[0]
    assert run.decode_video_visible == pytest.approx([int(videos * 0.3) / videos] * 5)
    assert set(run.timings) == {"vision", "compressor", "prefill", "decode", "ttft"}
    # the same generation step by step through the driver
    prompt = adapter.prepare(pixels, compressor, adapter.prompt_ids(QUESTION)[0])
    out = adapter.prefill(prompt, compressor, use_cache=True)
    policy, token, tokens = compressor.decode_policy(adapter.llm.shape), out.logits[0, -1].argmax(), []
    for _ in range(5):
        tokens.append(int(token))
        token = decoder.decode(adapter.llm, out.state, token.view(1, 1), policy)[0, -1].argmax()
    tokens.append(int(token))
    assert text == adapter.tokenizer.decode(tokens, skip_special_tokens=True)


def test_keep_everything_knobs_reproduce_none(adapter, pixels):
    none, keep_all = methods.build("none"), DyCoke(merge_ratio=0.0, prune_ratio=0.0)
    ids, _ = adapter.prompt_ids(QUESTION)
    a, b = adapter.prepare(pixels, none, ids), adapter.prepare(pixels, keep_all, ids)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.positions, b.positions)
    out_a, out_b = adapter.prefill(a, none, use_cache=True), adapter.prefill(b, keep_all, use_cache=True)
    assert torch.equal(out_a.logits, out_b.logits)
    policy = keep_all.decode_policy(adapter.llm.shape)
    token = out_a.logits[0, -1].argmax().view(1, 1)
    for _ in range(4):
        la = decoder.decode(adapter.llm, out_a.state, token)
        lb = decoder.decode(adapter.llm, out_b.state, token, policy)
        assert torch.equal(la, lb)
        token = la[0, -1].argmax().view(1, 1)
    assert out_b.state.decode_video_visible == [1.0] * 4
    text_a, _ = adapter.generate(pixels, QUESTION, none, max_new_tokens=6)
    text_b, run_b = adapter.generate(pixels, QUESTION, keep_all, max_new_tokens=6)
    assert text_a == text_b and run_b.decode_video_visible == [1.0] * 5
    # merging nothing but pruning the cache changes the decode steps only
    prune_only = DyCoke(merge_ratio=0.0, prune_ratio=0.7)
    c = adapter.prepare(pixels, prune_only, ids)
    out_c = adapter.prefill(c, prune_only, use_cache=True)
    assert torch.equal(out_c.logits, out_a.logits)
    first = out_c.logits[0, -1].argmax().view(1, 1)
    step = decoder.decode(adapter.llm, out_c.state, first, prune_only.decode_policy(adapter.llm.shape))
    full = decoder.decode(adapter.llm, adapter.prefill(a, none, use_cache=True).state, first)
    # hiding 70 % of the video matters: further apart than a cached decode and another kernel
    # path could be (c.embeds.shape[1] + 1 keys, LAYERS layers)
    assert not torch.allclose(step, full, **close(torch.float32, c.embeds.shape[1] + 1, depth=LAYERS))
    assert out_c.state.decode_video_visible == pytest.approx([int(FRAMES * 196 * 0.3) / (FRAMES * 196)])


def test_a_prefill_stage_at_the_decode_layer_is_an_error(adapter, pixels):
    pipeline = methods.build("pipeline", stages=["dycoke", "fastv"], fastv={"K": 1, "keep": 0.5},
                             dycoke={"layer": 1})
    with pytest.raises(ValueError, match="layers 0 and 1 cache different entries"):
        adapter.generate(pixels, QUESTION, pipeline, max_new_tokens=3)
    fine = methods.build("pipeline", stages=["dycoke", "fastv"], fastv={"K": 2, "keep": 0.5},
                         dycoke={"layer": 1})
    _, run = adapter.generate(pixels, QUESTION, fine, max_new_tokens=3)
    assert run.decode_video_visible == pytest.approx([int(370 * 0.3) / 370] * 2)


# ---- through the harness ------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_summary_reports_the_decode_kv_retention(cfg_factory):
    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=dycoke", "task.limit=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    frames = 8  # conf/model/tiny.yaml
    videos = merged_count(frames, 196, 0.7)
    assert summary["knobs"] == {"merge_ratio": 0.7, "layer": None, "prune_ratio": 0.7,
                                "reprune_threshold": 0.9}
    assert summary["retention"]["rho_tok"]["mean"] == pytest.approx(videos / (frames * 196))
    # the random model writes 8 tokens without a newline: 7 decode steps, each at int(V*0.3)/V
    assert summary["retention"]["rho_decode_kv"]["mean"] == pytest.approx(int(videos * 0.3) / videos)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(s["retention"]["rho_decode_kv"] == pytest.approx(int(videos * 0.3) / videos) for s in samples)


@pytest.mark.slow
def test_retention_calibrates_merge_ratio(cfg_factory, adapter):
    from harness.data.tasks import load_tasks, prepare_task_data
    from harness.run.calibrate import TOLERANCE, calibrate
    from tests.helpers import choice_of, job_of

    cfg = cfg_factory("+method=dycoke", "retention=0.5")
    choice = choice_of(cfg)
    assert choice.target_retention == 0.5 and choice.label == "r=0.5"
    prepare_task_data(job_of(cfg).task)
    tasks = load_tasks(job_of(cfg).task)
    result = calibrate(choice.compressor, 0.5, adapter, tasks, frames=cfg.model.frames,
                       size=cfg.task.calibration_size, identity={})
    k = result["knobs"]["merge_ratio"]
    frames = cfg.model.frames
    achieved = merged_count(frames, 196, k) / (frames * 196)
    assert result["achieved_on_calibration"] == pytest.approx(achieved)
    assert abs(achieved - 0.5) <= TOLERANCE / 4
    assert math.isclose(choice.compressor.merge_ratio, 0.7)  # the other knobs stay
