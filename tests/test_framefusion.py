"""FrameFusion (methods/framefusion.py): in-LLM merging then pruning to a FLOPs target.

The references never call methods/framefusion.py: tests/reference/framefusion.py restates the merge
and budget rules with loops in float64, and runs the whole prefill on the stock eager model (every
token stays in the sequence at its original position; merged-away and pruned tokens are masked,
merged heads get their states through hooks).
"""

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core import decoder
from methods.core.flops import LLMShape, retention_numbers
from methods.framefusion import FrameFusion, merge_step, removal_share
from tests.helpers.tolerance import bound, close
from tests.reference.framefusion import (
    reference_merge_step,
    reference_prefill,
    reference_removal_share,
)

LAYERS = 8  # decoder layers of the tiny smoke model
QUESTION = "What colour is the moving square?\nA. red\nB. blue"
TINY = LLMShape(64, 128, LAYERS)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")


@pytest.fixture(scope="module")
def clip(smoke_questions, adapter):
    p = adapter.preprocessing

    def frames(count):
        return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", count),
                          p.size, p.mean, p.std)
    return frames


def stock(eager):
    return eager.model.model.language_model, eager.model.lm_head


def synthetic_prompt(adapter, frames, scales, seed=0):
    """The question's text embeddings around a synthetic video: per grid position a base vector,
    each frame adds noise of one of `scales` (0: the position repeats exactly), so the merge sites
    see similarities far from the thresholds. The video placeholder's own embedding stands in for
    the newline (a text token)."""
    ids, _ = adapter.prompt_ids(QUESTION)
    where = ids.index(adapter.video_token_id)
    with torch.no_grad():
        text = adapter.model.get_input_embeddings()(torch.tensor(ids))
    g = torch.Generator().manual_seed(seed)
    dim = text.shape[1]
    base = torch.randn(196, dim, generator=g)
    noise = torch.tensor(scales)[torch.randint(0, len(scales), (196,), generator=g)]
    video = (base[None] + noise[None, :, None] * torch.randn(frames, 196, dim, generator=g)).flatten(0, 1)
    video = video * (text.norm(dim=-1).mean() / video.norm(dim=-1).mean())
    embeds = torch.cat([text[:where], video, text[where:where + 1], text[where + 1:]])[None]
    span = (where, where + frames * 196)
    return embeds, torch.arange(embeds.shape[1])[None], span


def run_policy(adapter, embeds, positions, span, compressor, use_cache=True):
    policy = compressor.prefill_policy(adapter.llm.shape)
    out = decoder.prefill(adapter.llm, embeds, positions, span, policy, use_cache=use_cache, frame_tokens=196)
    return policy, out


# ---- knobs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"cost": 0.0}, r"framefusion.cost=0.0: expected a value in \(0.0, 1.0\]"),
    ({"cost": 1.2}, "framefusion.cost=1.2"), ({"cost": "low"}, "framefusion.cost='low'"),
    ({"sim_floor": 1.5}, r"framefusion.sim_floor=1.5: expected a value in \[-1.0, 1.0\]"),
    ({"merge_floor": -0.1}, r"framefusion.merge_floor=-0.1: expected a value in \[0.0, 1.0\]"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("framefusion", **knobs)


def test_retention_sets_cost_directly(cfg_factory):
    from tests.helpers import choice_of

    choice = choice_of(cfg_factory("+method=framefusion", "retention=0.4"))
    assert choice.knobs == {"cost": 0.4, "sim_floor": 0.6, "merge_floor": 0.1}
    assert choice.target_retention is None and choice.label == "r=0.4,sim_floor=0.6,merge_floor=0.1"
    choice = choice_of(cfg_factory("+method=framefusion", "method.cost=0.5", "method.sim_floor=0.8"))
    assert choice.knobs == {"cost": 0.5, "sim_floor": 0.8, "merge_floor": 0.1}
    assert FrameFusion().prefill_policy(TINY).planned(784) is None  # data-dependent: no calibration


# ---- the merge rule against the literal reference ------------------------------------------------
def tokens(frames, per_frame, dim, seed, scales=(0.0, 0.2, 0.5, 2.0), drop=0.0):
    """Video tokens in sequence order with their grid positions; `drop` removes that share at
    random (as earlier merges do, leaving ragged per-position chains)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(per_frame, dim, generator=g)
    noise = torch.tensor(scales)[torch.randint(0, len(scales), (per_frame,), generator=g)]
    x = (base[None] + noise[None, :, None] * torch.randn(frames, per_frame, dim, generator=g)).flatten(0, 1)
    slots = torch.arange(per_frame).repeat(frames)
    alive = torch.rand(frames * per_frame, generator=g) >= drop
    alive[:per_frame] = True
    return x[alive], slots[alive]


EXACT, NOISY = (0.0, 0.2, 0.5, 2.0), (0.1, 0.3, 0.6, 2.0)  # with / without exact repeats
CASES = [  # frames, per_frame, dim, seed, drop, sim_floor, limit, merge_floor, noise scales
    (4, 49, 16, 0, 0.0, 0.6, 0.7, 0.1, EXACT),  # threshold branch: all similar merge, go on
    (4, 49, 16, 1, 0.0, 0.6, 0.2, 0.1, NOISY),  # budget branch: the int(limit*V) most similar
    (3, 49, 16, 2, 0.0, 0.9, 0.9, 0.5, EXACT),  # odd frames; share below merge_floor: stop
    (5, 30, 8, 3, 0.3, 0.6, 0.8, 0.1, EXACT),  # ragged chains after earlier merges
    (5, 30, 8, 4, 0.5, 0.3, 0.05, 0.1, NOISY),
    (1, 49, 16, 5, 0.0, 0.6, 0.5, 0.1, EXACT),  # one frame: nothing to compare, nothing merges
    (2, 49, 16, 6, 0.0, 0.6, 0.0, 0.1, NOISY),  # limit 0 (budget met): nothing merges, all stops
    (6, 20, 8, 7, 0.2, -1.0, 0.99, 0.1, EXACT),  # every token with a predecessor merges
    (6, 20, 8, 8, 0.2, 1.0, 0.99, 0.1, NOISY),  # none does
]


@pytest.mark.parametrize("frames, per_frame, dim, seed, drop, sim_floor, limit, merge_floor, scales", CASES)
def test_merge_step_equals_the_literal_reference(frames, per_frame, dim, seed, drop, sim_floor, limit,
                                                 merge_floor, scales):
    x, slots = tokens(frames, per_frame, dim, seed, scales, drop)
    ref = reference_merge_step(x, slots.tolist(), sim_floor, limit, merge_floor)
    assert ref.margin > 1e-6  # no decision is float32 round-off
    got = merge_step(x, slots, sim_floor, limit, merge_floor)
    assert got.keep.tolist() == ref.keep
    # float32 means against float64 means: a merged token averages a run of at most `frames` tokens
    torch.testing.assert_close(got.hidden.double(), ref.hidden, **close(torch.float32, frames))
    assert (got.merged, got.ratio, got.stop, got.prune) == (ref.merged, ref.ratio, ref.stop, ref.prune)
    assert len(got.keep) == len(x) - got.merged
    assert got.hidden.dtype == x.dtype


def test_merge_step_examples_by_hand():
    # one grid position over 5 frames: t1, t2 repeat t0, t3 is new, t4 repeats t3
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([a, a, 2 * a, b, b + 0.01 * a])
    got = merge_step(x, torch.zeros(5, dtype=torch.long), 0.9, 1.0, 0.1)
    assert got.keep.tolist() == [0, 3] and got.merged == 3 and got.ratio == 0.6
    # the method's means against the arithmetic by hand: runs of at most 3 tokens
    torch.testing.assert_close(got.hidden, torch.stack([(a + a + 2 * a) / 3, (2 * b + 0.01 * a) / 2]),
                               **close(torch.float32, 3))
    # identical tokens everywhere: the budget picks the first int(0.5*8) of the tied ones in
    # grid order (position 0's frames 1..3, then position 1's frame 1), and nothing is pruned after
    x = torch.ones(8, 3)
    got = merge_step(x, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]), 0.6, 0.5, 0.1)
    assert got.keep.tolist() == [0, 1, 5, 7] and (got.stop, got.prune) == (True, False)
    torch.testing.assert_close(got.hidden, torch.ones(4, 3), **close(torch.float32, 4))  # means of 1s


def test_merge_step_keeps_bfloat16_and_decides_in_float32():
    x, slots = tokens(4, 49, 16, 9, NOISY)
    x = x.bfloat16()
    got = merge_step(x, slots, 0.6, 0.7, 0.1)
    ref = reference_merge_step(x.float(), slots.tolist(), 0.6, 0.7, 0.1)
    assert got.hidden.dtype == torch.bfloat16 and got.keep.tolist() == ref.keep
    # float32 means and float64 means (runs of at most 4 tokens), each rounded once to bfloat16:
    # one bfloat16 rounding apart, plus the float32 sums
    tol = bound(torch.bfloat16, 1) + bound(torch.float32, 4)
    torch.testing.assert_close(got.hidden, ref.hidden.bfloat16(), rtol=tol, atol=tol)


# ---- the FLOPs budget -------------------------------------------------------------------------------
@pytest.mark.parametrize("cost, text, video, spent, spent_mlp, current, shape", [
    # spent / spent_mlp: video tokens each layer's attention / MLP ran on so far
    (0.3, 100, 32 * 196, [], [], 32 * 196, LLMShape(3584, 18944, 28)),  # before layer 0
    (0.3, 100, 32 * 196, [32 * 196], [], 32 * 196, LLMShape(3584, 18944, 28)),  # in layer 0
    (0.3, 100, 32 * 196, [6272, 5000, 4000], [5000, 4000], 4000, LLMShape(3584, 18944, 28)),  # in layer 2
    (0.5, 87, 16 * 196, [3136, 3000], [3000], 3000, LLMShape(896, 4864, 24)),
    (0.3, 60, 1568, [1568, 1159, 884], [1159, 884], 884, TINY),
    (0.3, 60, 1568, [1159, 884], [1159, 884], 871, TINY),  # before layer 2 (the rule is general)
    (0.9, 60, 1568, [], [], 1568, TINY),
    (1.0, 60, 1568, [], [], 1568, TINY),
    (1.0, 60, 1568, [1568], [], 1568, TINY),
    (0.6, 60, 1568, [1568] * 4, [1568] * 3, 1568, TINY),
    (0.995, 60, 1568, [1568] * 8, [1568] * 7, 1568, TINY),  # in the last layer: its MLP alone is left
])
def test_removal_share_equals_the_literal_budget(cost, text, video, spent, spent_mlp, current, shape):
    got = removal_share(cost, text, video, spent, spent_mlp, current, shape)
    ref = reference_removal_share(cost, text, video, spent, spent_mlp, current, shape.hidden, shape.ffn,
                                  shape.layers)
    # two float64 transcriptions of the budget: FLOPs summed over the layers, a quadratic solved
    # for the tokens, then the share
    tol = bound(torch.float64, shape.layers, depth=3)
    assert got == pytest.approx(ref, rel=tol, abs=tol)
    if cost == 1.0:
        assert got == 0.0  # the whole budget: nothing to remove, exactly


def test_removal_share_is_the_officials_formula_for_a_linear_cost():
    """With the n^2 term off, no text and the MLP half free, FLOPs are linear in the tokens each
    layer's attention sees, the official's token budget: its `_compute_pruning_ratio` (with the
    real depth instead of 28) is what remains. Sites: before layer 0, then in layers 0, 1, ..."""
    shape = LLMShape(64, 128, 28)

    def official(ratios, cost, layers=28):
        s, total = 1, 0
        for r in ratios:
            s *= 1 - r
            total += s
        remain = layers * cost - total
        return max(0.0, 1 - remain / ((layers - len(ratios)) * s))

    from unittest import mock

    with mock.patch("methods.framefusion.prefill_flops", lambda t, v, sh, mlp=None: sum(x for x in v)), \
            mock.patch("methods.framefusion.attention_flops", lambda n, d: n), \
            mock.patch("methods.framefusion.mlp_flops", lambda n, d, m: 0), \
            mock.patch("methods.framefusion.layer_flops", lambda n, d, m: n), \
            mock.patch("methods.framefusion.tokens_within", lambda b, layers, t, sh, mlp_only=0: b / layers - t):
        video = 10000
        for ratios in ([], [0.4], [0.4, 0.05], [0.2, 0.3, 0.1]):
            counts, current = [], video  # counts[j]: after site j, what layer j's attention sees
            for r in ratios:
                current = current * (1 - r)
                counts.append(current)
            # the next site is in layer len(ratios) - 1: its attention and the earlier MLPs ran
            got = removal_share(0.3, 0, video, counts, counts[1:], current, shape)
            # two float64 transcriptions of the linear budget: sums over at most 28 layers, then the share
            tol = bound(torch.float64, 28, depth=3)
            assert got == pytest.approx(official(ratios, 0.3), rel=tol, abs=tol)


def test_an_unreachable_cost_names_the_floor():
    with pytest.raises(ValueError, match=r"framefusion.cost=0.001: unreachable on this prompt \(60 text and "
                                         r"1568 video tokens\).*cost 0\.\d\d% of the unpruned"):
        removal_share(0.001, 60, 1568, [], [], 1568, TINY)
    with pytest.raises(ValueError, match=r"what ran so far \(3 attention and 2 MLP halves\) and the text alone "
                                         r"in the other halves cost 33\.\d\d%"):
        removal_share(0.1, 60, 1568, [1568, 1500, 1400], [1500, 1400], 1400, TINY)


# ---- prefill against the stock model -------------------------------------------------------------
SYNTHETIC = [  # frames, noise scales, cost, sim_floor, merge_floor: the path it takes
    (3, [0.0, 0.3, 3.0], 0.3, 0.6, 0.1),  # site 0 merges, site 1 none: prune at site 2
    (4, [0.0, 0.3, 3.0], 0.5, 0.6, 0.1),  # site 0 meets the budget by merging alone
    (4, [0.0, 0.2, 0.4, 3.0], 0.25, 0.85, 0.01),  # four merging sites, then pruning
    (4, [0.0, 0.3, 3.0], 0.22, 0.9, 0.005),  # four merging sites, pruning to 65 (0.2 is below the
    # floor: layer 3's attention ran on the 423 tokens before its site)
    (5, [0.05, 0.4, 3.0], 0.3, 0.9, 0.1),
    (1, [0.0, 0.3, 3.0], 0.3, 0.6, 0.1),  # one frame: nothing merges; pruning in layer 0
]


def check_against_reference(adapter, eager, embeds, positions, span, compressor, min_margin=1e-5):
    policy, out = run_policy(adapter, embeds, positions, span, compressor)
    start, end = span
    total = embeds.shape[1]
    text = total - (end - start)
    ref = reference_prefill(*stock(eager), embeds, span, text, total - 1, compressor.cost,
                            compressor.sim_floor, compressor.merge_floor)
    assert ref.margin > min_margin  # no merge decided by float32 round-off
    # per layer, the video tokens its attention and its MLP ran on; the budget charged the same
    assert out.layer_video_tokens == ref.attention and out.layer_mlp_video_tokens == ref.mlp
    assert policy.spent == ref.attention[:len(policy.spent)]
    assert policy.spent_mlp == ref.mlp[:len(policy.spent_mlp)]
    assert out.kept.tolist() == ref.alive  # text (and the newline) is never merged or pruned
    assert set(range(start)) | set(range(end, total)) <= set(ref.alive)
    assert policy.ratios == pytest.approx(ref.ratios, abs=0)
    # the driver's prefill against the stock eager forward with merges and masks: attention sums
    # over at most `total` keys, in each of LAYERS layers (tests/helpers/tolerance.py)
    torch.testing.assert_close(out.logits, ref.logits[:, out.kept], **close(torch.float32, total, depth=LAYERS))
    # every layer caches what its attention saw (the attention input), at original positions
    assert [layer.keys.shape[-2] for layer in out.state.cache.layers] == [text + v for v in ref.attention]
    return out, ref


@pytest.mark.parametrize("frames, scales, cost, sim_floor, merge_floor", SYNTHETIC)
def test_prefill_equals_the_stock_model_with_merges_and_masks(adapter, eager, frames, scales, cost, sim_floor,
                                                              merge_floor):
    embeds, positions, span = synthetic_prompt(adapter, frames, scales)
    compressor = FrameFusion(cost=cost, sim_floor=sim_floor, merge_floor=merge_floor)
    out, ref = check_against_reference(adapter, eager, embeds, positions, span, compressor)
    # the FLOPs target is met to within one video token in the layers after the last decision
    text = embeds.shape[1] - (span[1] - span[0])
    assert_cost_met(cost, span[1] - span[0], text, out.layer_video_tokens, out.layer_mlp_video_tokens)


def assert_cost_met(cost, video, text, attention, mlp):
    """The harness's rho_flops (each layer's attention and MLP at its own count) is `cost` to within
    one video token more in every half layer from the last change of count on."""
    halves = [c for pair in zip(attention, mlp) for c in pair]  # attention 0, MLP 0, attention 1, ...
    last = max([i for i in range(1, len(halves)) if halves[i] != halves[i - 1]], default=0)
    more = halves[:last] + [c + 1 for c in halves[last:]]

    def rho_flops(h):
        return retention_numbers(video, text, h[0::2], TINY, h[1::2])["rho_flops"]

    achieved = rho_flops(halves)
    assert abs(achieved - cost) <= rho_flops(more) - achieved


def test_prefill_on_a_real_video_equals_the_stock_reference(adapter, eager, clip):
    """The smoke clips barely change between frames: similarities crowd near 1, so this input is
    chosen for a top-k cut at least 4e-6 (about 30 float32 steps) wide."""
    compressor = FrameFusion(cost=0.25)
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(clip(6), compressor, ids)
    out, ref = check_against_reference(adapter, eager, prompt.embeds, prompt.positions, prompt.span, compressor,
                                       min_margin=3e-6)
    assert len(ref.ratios) == 1  # the smoke clip repeats itself: merging alone meets the budget


@pytest.mark.parametrize("cost", [0.15, 0.3, 0.45, 0.6, 0.9])
def test_achieved_flops_ratio_is_the_cost_within_one_token(adapter, clip, cost):
    ids, _ = adapter.prompt_ids(QUESTION)
    compressor = FrameFusion(cost=cost)
    prompt = adapter.prepare(clip(8), compressor, ids)
    adapter.prefill(prompt, compressor, use_cache=False)
    run = prompt.run
    assert_cost_met(cost, 8 * 196, run.text_tokens, run.layer_video_tokens, run.layer_mlp_video_tokens)


@pytest.mark.parametrize("use_cache", [False, True])
def test_cost_one_reproduces_the_unpruned_logits(adapter, clip, use_cache):
    ids, _ = adapter.prompt_ids(QUESTION)
    compressor = FrameFusion(cost=1.0)
    prompt = adapter.prepare(clip(4), compressor, ids)
    out = adapter.prefill(prompt, compressor, use_cache=use_cache)
    with torch.no_grad():
        expected = adapter.model(inputs_embeds=prompt.embeds).logits
    # keeping every token runs the stock layers on the same inputs in the same order (the driver
    # with `none` is the stock model exactly, tests/test_model.py): exact
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert prompt.run.layer_video_tokens == prompt.run.layer_mlp_video_tokens == [4 * 196] * LAYERS


def test_unreachable_cost_is_an_error_naming_the_floor(adapter):
    # four merging sites leave too many tokens in the first layers for 20 % of the FLOPs
    embeds, positions, span = synthetic_prompt(adapter, 4, [0.0, 0.2, 0.4, 3.0])
    compressor = FrameFusion(cost=0.2, sim_floor=0.9, merge_floor=0.005)
    with pytest.raises(ValueError, match=r"framefusion.cost=0.2: unreachable on this prompt .* what ran so "
                                         r"far \(\d attention and \d MLP halves\) and the text alone .* "
                                         r"cost 2\d\.\d\d%"):
        run_policy(adapter, embeds, positions, span, compressor)


@pytest.mark.slow
def test_cached_decoding_matches_the_uncached_stock_reference(adapter, eager):
    """With generated tokens appended, the stock reference reruns everything uncached (the same
    merges and pruning: the video states do not see later tokens, pruning asks the last prompt
    token); each cached decode step's logits must match its last row."""
    embeds, positions, span = synthetic_prompt(adapter, 4, [0.0, 0.2, 0.4, 3.0])
    compressor = FrameFusion(cost=0.25, sim_floor=0.85, merge_floor=0.01)
    _, out = run_policy(adapter, embeds, positions, span, compressor)
    total = embeds.shape[1]
    text, query = total - (span[1] - span[0]), total - 1
    state, logits, tokens = out.state, out.logits[0, -1], []
    embed = adapter.model.get_input_embeddings()
    for _ in range(5):
        token = int(logits.argmax())
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
            logits = decoder.decode(adapter.llm, state, torch.tensor([[token]]))[0, -1]
        ref = reference_prefill(*stock(eager), embeds, span, text, query, compressor.cost,
                                compressor.sim_floor, compressor.merge_floor)
        # cached decode against the uncached stock eager recompute: at most embeds.shape[1] keys,
        # LAYERS layers
        torch.testing.assert_close(logits, ref.logits[0, -1], **close(torch.float32, embeds.shape[1], depth=LAYERS))
    assert len(tokens) == 5
    assert [layer.keys.shape[-2] for layer in state.cache.layers] == [
        text + v + 5 for v in ref.attention]


@pytest.mark.slow
def test_end_to_end_generation_through_the_adapter(cfg_factory, adapter, clip):
    from tests.helpers import choice_of

    compressor = choice_of(cfg_factory("+method=framefusion", "retention=0.3")).compressor
    assert compressor.cost == 0.3
    text, run = adapter.generate(clip(8), QUESTION, compressor, max_new_tokens=4)
    assert_cost_met(0.3, 8 * 196, run.text_tokens, run.layer_video_tokens, run.layer_mlp_video_tokens)
    assert 0 < run.timings["compressor"] < run.timings["prefill"]
