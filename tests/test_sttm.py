"""STTM (methods/sttm.py) against its literal reference, the stock model and its golden file.

The references never call methods/sttm.py: tests/reference/sttm.py restates the merge in float64
loops; the prefill and decode references run the stock Qwen2 model (its own forward, explicit
position ids and causal masks) on the reference's merged states at the official positions.
"""

from pathlib import Path

import pytest
import torch

import methods
from harness.errors import ConfigError
from methods.core.flops import LLMShape
from methods.sttm import (
    STTM,
    child_slots,
    official_representatives,
    pool_level,
    pyramid_sides,
    sttm_merge,
)
from tests.helpers.tolerance import close
from tests.reference.sttm import connected_components, official_rounds, reference_sttm

FRAMES, LAYERS = 4, 8  # frames of the clip, decoder layers of both small models
QUESTIONS = ["What colour is the moving square?\nA. red\nB. blue",
             "Which way does the square move?\nA. left\nB. right\nC. up\nD. down\nAnswer with the letter."]
MERGING = {"tau_s": 0.995, "tau_t": 0.995}  # merges about 7 in 8 tokens of the tiny model's states
GOLDEN = Path(__file__).parent / "golden" / "sttm_golden.pt"


@pytest.fixture(scope="module")
def llava(tiny_llava, smoke_questions):
    return tiny_llava, tiny_llava.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)


def structured(frames, h, w, dim, seed, moving=0.4):
    """Video states made of 4x4 blocks, a share `moving` of the tokens changing after frame 0."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(frames, (h + 3) // 4, (w + 3) // 4, dim, generator=g)
    video = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :h, :w].clone()
    changed = torch.rand(frames - 1, h, w, 1, generator=g) < moving
    video[1:] = video[:1] + torch.where(changed, 1.0, 0.1) * torch.randn(frames - 1, h, w, dim, generator=g)
    return video + 0.2 * torch.randn(frames, h, w, dim, generator=g)


# ---- knobs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"tau_s": 1.5}, r"sttm.tau_s=1.5: expected a value in \[-1.0, 1.0\] or null"),
    ({"tau_t": 0.0}, r"sttm.tau_t=0.0: expected a value in \(0.0, 1.0\] or null"),
    ({"tau_t": -1.0}, "sttm.tau_t=-1.0"), ({"root_level": -1}, "sttm.root_level=-1"),
    ({"layer": -1}, "sttm.layer=-1"), ({"positions": "first"}, "sttm.positions='first': expected one of"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("sttm", **knobs)


def test_layer_at_or_beyond_the_depth_is_an_error():
    with pytest.raises(ValueError, match=r"sttm.layer=8: expected a layer in \[0, 7\]"):
        STTM(layer=8).prefill_policy(LLMShape(64, 128, LAYERS))
    assert STTM(layer=0).prefill_policy(LLMShape(64, 128, LAYERS)).layers == (0,)  # the 72B preset


# ---- the pyramid ------------------------------------------------------------------------------------
def test_the_pyramid_follows_the_official_sizes_and_odd_side_slots():
    assert pyramid_sides(14, 14) == [(2, 2), (4, 4), (7, 7), (14, 14)]
    assert pyramid_sides(16, 9) == [(2, 2), (4, 3), (8, 5), (16, 9)]
    assert pyramid_sides(2, 5) == [(2, 5)]
    with pytest.raises(ValueError, match="1x5 token grid has no pyramid"):
        pyramid_sides(1, 5)
    ys, xs, valid = child_slots(7, 7)  # 7x7 -> 4x4: the odd step
    assert valid[0, 0].tolist() == [True, False, False, False]
    assert (ys[0, 0].tolist(), xs[0, 0].tolist()) == ([0, 0, 0, 0], [0, 0, 0, 0])
    # a first-row node: a 1x2 stripe, its missing slots point at child (0, 0)
    assert (ys[0, 2].tolist(), xs[0, 2].tolist(), valid[0, 2].tolist()) == (
        [0, 0, 0, 0], [3, 4, 0, 0], [True, True, False, False])
    assert (ys[2, 0].tolist(), xs[2, 0].tolist(), valid[2, 0].tolist()) == (
        [3, 0, 4, 0], [0, 0, 0, 0], [True, False, True, False])
    assert (ys[1, 1].tolist(), xs[1, 1].tolist()) == ([1, 1, 2, 2], [1, 2, 1, 2])
    x = torch.arange(9.0).view(1, 3, 3, 1)  # odd both ways: copy, stripes, 2x2
    assert pool_level(x).flatten().tolist() == [0.0, 1.5, 4.5, 6.0]
    with pytest.raises(ValueError, match=r"sttm.root_level=4: a 14x14 token grid has pyramid levels 0..3"):
        sttm_merge(torch.randn(196, 4), 1, (14, 14), 0.9, None, root_level=4)


# ---- the merge against the reference ------------------------------------------------------------------
@pytest.mark.parametrize("grid, frames, tau_s, tau_t, root, seed", [
    ((14, 14), 3, 0.8, 0.7, 1, 0), ((14, 14), 4, 0.6, 0.5, 0, 1), ((16, 16), 2, 0.7, 0.6, 1, 2),
    ((7, 7), 3, 0.5, 0.4, 1, 3), ((9, 6), 3, 0.6, 0.5, 1, 4), ((6, 9), 2, 0.6, 0.5, 0, 5),
    ((14, 14), 3, None, 0.6, 1, 6), ((14, 14), 3, 0.7, None, 1, 7), ((5, 5), 2, 0.3, 0.3, 0, 8),
])
def test_merge_equals_the_literal_reference_on_structured_states(grid, frames, tau_s, tau_t, root, seed):
    h, w = grid
    video = structured(frames, h, w, 16, seed)
    ref = reference_sttm(video, tau_s, tau_t, root)
    assert ref.margin > 1e-5  # no decision within float32 round-off of its threshold
    index, states = sttm_merge(video.flatten(0, 2), frames, grid, tau_s, tau_t, root)
    assert index.tolist() == ref.keys
    torch.testing.assert_close(states.double(), ref.states, **close(torch.float32, frames * h * w))


@pytest.mark.parametrize("seed", range(4))
def test_merge_equals_the_literal_reference_on_random_states(seed):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(3, 14, 14, 4, generator=g) + torch.randn(1, 1, 1, 4, generator=g)
    ref = reference_sttm(video, 0.5, 0.6, 1)
    assert ref.margin > 1e-5
    index, states = sttm_merge(video.flatten(0, 2), 3, (14, 14), 0.5, 0.6, 1)
    assert index.tolist() == ref.keys and len(index) < 3 * 196
    torch.testing.assert_close(states.double(), ref.states, **close(torch.float32, 3 * 196))


def test_the_official_representative_rounds_and_their_early_stop():
    first, second = torch.tensor([0, 5, 3]), torch.tensor([5, 10, 10])
    rep = official_representatives(first, second, 11)
    assert rep.tolist() == official_rounds([(0, 5), (5, 10), (3, 10)], 11) == [0, 1, 2, 3, 4, 0, 6, 7, 8, 9, 3]
    assert connected_components([(0, 5), (5, 10), (3, 10)], 11)[10] == 0  # a full union-find joins them
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random chains across frames
        pairs = torch.randint(0, 30, (25, 2), generator=g).sort(dim=1).values
        pairs = pairs[pairs[:, 0] < pairs[:, 1]]
        got = official_representatives(pairs[:, 0], pairs[:, 1], 30)
        assert got.tolist() == official_rounds([tuple(p) for p in pairs.tolist()], 30)


def test_kept_counts_are_exact():
    still = torch.randn(1, 1, 1, 8).expand(3, 14, 14, 8).flatten(0, 2)  # one state everywhere
    index, states = sttm_merge(still, 3, (14, 14), 0.9, 0.9)
    assert index.tolist() == [y * 14 + x for y in (0, 2, 6, 10) for x in (0, 2, 6, 10)]  # frame 0's 4x4 roots
    assert sttm_merge(still, 3, (14, 14), 0.9, None)[0].tolist() == [
        t * 196 + y * 14 + x for t in range(3) for y in (0, 2, 6, 10) for x in (0, 2, 6, 10)]
    assert sttm_merge(still, 3, (14, 14), None, 0.9)[0].tolist() == list(range(196))
    assert sttm_merge(still, 3, (14, 14), None, None)[0].tolist() == list(range(3 * 196))
    torch.testing.assert_close(states, still[:16].float())


def test_golden():
    for case in torch.load(GOLDEN):
        video = case["video"].float()
        frames = video.shape[0]
        index, states = sttm_merge(video.flatten(0, 2), frames, case["grid"], case["tau_s"], case["tau_t"],
                                   case["root_level"])
        assert torch.equal(index, case["keys"])
        torch.testing.assert_close(states, case["states"], **close(torch.float32, video.shape[0] * 196))


# ---- the LLM -------------------------------------------------------------------------------------------
def stock_tail(adapter, hidden, positions, layer):
    """The stock Qwen2 forward of layers `layer`.. on `hidden` at `positions`, causal; logits."""
    lm = adapter.model.model.language_model
    full, depth = lm.layers, lm.config.num_hidden_layers
    lm.layers = torch.nn.ModuleList(list(full)[layer:])
    lm.config.num_hidden_layers = len(lm.layers)
    n = hidden.shape[1]
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=hidden, position_ids=positions, use_cache=False,
                     attention_mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None]).last_hidden_state
    finally:
        lm.layers, lm.config.num_hidden_layers = full, depth
    return adapter.model.lm_head(out)


def reference_logits(adapter, embeds, span, prompt, layer, knobs, positions):
    """Stock logits: layers < K on every entry; the prompt's video run at layer K replaced by the
    reference merge; layers >= K on [merged prompt, entries after the prompt] at the rule's ids
    (compact: 0..M-1, then the unmerged prompt's next ids; original: the survivors' own ids).
    Returns (logits, prompt indices of the merged prompt's entries)."""
    start, end = span
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
    ref = reference_sttm(h[0, start:end].view(FRAMES, 14, 14, -1), knobs["tau_s"], knobs["tau_t"])
    assert ref.margin > 1e-5
    kept = list(range(start)) + [start + k for k in ref.keys] + list(range(end, prompt))
    merged = torch.cat([h[:, :start], ref.states[None].float(), h[:, end:]], 1)
    after = list(range(prompt, embeds.shape[1]))
    ids = (list(range(len(kept))) if positions == "compact" else kept) + after
    return stock_tail(adapter, merged, torch.tensor(ids)[None], layer), kept


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_prefill_and_cached_decoding_equal_the_stock_model_on_the_merged_states(llava, positions):
    adapter, pixels = llava
    compressor = STTM(positions=positions, **MERGING)
    ids, _ = adapter.prompt_ids(QUESTIONS[0])
    prompt = adapter.prepare(pixels, compressor, ids)
    total = prompt.embeds.shape[1]
    out = adapter.prefill(prompt, compressor, use_cache=True)
    expected, kept = reference_logits(adapter, prompt.embeds, prompt.span, total, 2, MERGING, positions)
    assert out.kept.tolist() == kept
    tol = close(torch.float32, total + 64, depth=LAYERS)
    torch.testing.assert_close(out.logits, expected, **tol)
    video = len(kept) - (total - FRAMES * 196)
    assert prompt.run.layer_video_tokens == [FRAMES * 196] * 2 + [video] * (LAYERS - 2)
    assert [layer.keys.shape[-2] for layer in out.state.cache.layers] == [total] * 2 + [len(kept)] * (LAYERS - 2)
    # decoding: every step equals the uncached stock reference with the generated tokens appended
    state, token, embeds = out.state, out.logits[0, -1].argmax().view(1, 1), prompt.embeds
    for _ in range(3):
        from methods.core import decoder

        logits = decoder.decode(adapter.llm, state, token)
        embeds = torch.cat([embeds, adapter.model.get_input_embeddings()(token)], 1)
        expected, _ = reference_logits(adapter, embeds, prompt.span, total, 2, MERGING, positions)
        torch.testing.assert_close(logits, expected[:, -1:], **tol)
        token = logits[0, -1].argmax().view(1, 1)


def test_keeping_everything_is_none(llava):
    adapter, pixels = llava
    none, everything = methods.build("none"), STTM(tau_s=None, tau_t=None)
    ids, _ = adapter.prompt_ids(QUESTIONS[0])
    a = adapter.prefill(adapter.prepare(pixels, none, ids), none, use_cache=False)
    prompt = adapter.prepare(pixels, everything, ids)
    b = adapter.prefill(prompt, everything, use_cache=False)
    assert torch.equal(a.logits, b.logits)  # the same kernels on the same inputs
    assert prompt.run.layer_video_tokens == [FRAMES * 196] * LAYERS


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl"])
def family(request, tiny_llava, qwen, smoke_questions):
    adapter = {"llava_onevision": tiny_llava, "qwen2_5_vl": qwen}[request.param]
    return adapter, adapter.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)


def test_a_shared_prefix_gives_the_logits_of_the_whole_prompt(family):
    """STTM reads no question: the engine's [head + video] prefix, compacted (OneVision) or at the
    original M-RoPE ids (Qwen2.5-VL), continued with each question, gives one prefill's logits."""
    adapter, pixels = family
    compressor = STTM(**MERGING)
    assert compressor.shares_prefix
    compressed = adapter.compress(pixels, compressor)
    prefix = adapter.shared_prefix(compressed, compressor, adapter.prompt_ids(QUESTIONS[0])[0])
    assert min(prefix.layer_video_tokens) < max(prefix.layer_video_tokens)  # it merged
    length = prefix.state.cache.get_seq_length()
    for question in QUESTIONS:
        ids, _ = adapter.prompt_ids(question)
        whole = adapter.prompt(compressed, ids)
        rest = whole.embeds.shape[1] - prefix.length  # the question's entries
        expected = adapter.prefill(whole, compressor, use_cache=False).logits[0, -rest:]
        shared, _ = adapter._continue(prefix, adapter.prompt(compressed, ids), logits_to_keep=0)
        prefix.state.rewind(prefix.mark)
        assert prefix.state.cache.get_seq_length() == length
        torch.testing.assert_close(shared[0], expected, **close(torch.float32, whole.embeds.shape[1] + 64,
                                                                 depth=LAYERS))
        text_shared, _ = adapter.generate(compressed, question, compressor, 4, prefix=prefix)
        assert text_shared == adapter.generate(compressed, question, compressor, 4)[0]


def test_qwen_keeps_the_survivors_original_ids_and_refuses_compact(qwen, smoke_questions):
    pixels = qwen.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)
    compressor = STTM(**MERGING)
    ids, _ = qwen.prompt_ids(QUESTIONS[0])
    prompt = qwen.prepare(pixels, compressor, ids)
    (start, end), total = prompt.span, prompt.embeds.shape[1]
    out = qwen.prefill(prompt, compressor, use_cache=True)
    video = [o - start for o in out.kept.tolist() if start <= o < end]
    lm = qwen.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=prompt.embeds, position_ids=prompt.positions,
               output_hidden_states=True).hidden_states[2]
    grid = qwen.encode_video(pixels).visual.grid
    frames = (end - start) // (grid[0] * grid[1])
    ref = reference_sttm(h[0, start:end].view(frames, *grid, -1), MERGING["tau_s"], MERGING["tau_t"])
    assert ref.margin > 1e-5 and video == ref.keys and len(video) < end - start
    assert out.state.position_shift is None  # original ids: nothing compacted
    assert out.state.next_position.flatten().tolist() == [prompt.positions.amax().item() + 1] * 3
    with pytest.raises(ValueError, match="sttm.positions=compact needs 1-D position ids"):
        qwen.prefill(qwen.prepare(pixels, STTM(positions="compact"), ids), STTM(positions="compact"),
                     use_cache=False)
    assert total > len(out.kept)


def test_a_retention_target_is_refused_in_one_line():
    from harness.run.calibrate import CalibrationSet, search

    with pytest.raises(ConfigError, match="sttm's prefill keeps a data-dependent number of tokens"):
        search(STTM(), 0.5, CalibrationSet([60], [FRAMES * 196]), LLMShape(64, 128, LAYERS))


@pytest.mark.slow
def test_a_harness_run(cfg_factory):
    import json

    from tests.helpers import run_config

    run_dir = run_config(cfg_factory("+method=sttm", "task.limit=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["knobs"] == {"layer": 2, "root_level": 1, "tau_s": 0.85, "tau_t": 0.65, "positions": None}
    assert 0 < summary["retention"]["rho_tok"]["mean"] < 1
