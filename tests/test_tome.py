"""methods/tome.py and the encoder stage (methods/core/base.py, harness/models/llava_onevision.py).

Against the literal reference (tests/reference/tome.py, the official merge.py, parse_r and ToMe block
in float64): float64 input makes the implementation decide in float64 too, so the pure functions are
compared exactly. The encoder loop is checked against transformers' SigLIP (no merges: exactly) and,
with merges, against the reference ToMe encoder on a float64 copy of the tiny model's tower. Keeping
everything (r = 0) equals `none` bit for bit; the stage checks (pipelines, Qwen2.5-VL's refusal), the
feature cache's keys and the vision FLOPs are checked here too; the runs in the harness are slow.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

import methods
from harness.data.feature_cache import FeatureCache, encode_input, read_input
from harness.errors import ConfigError
from harness.files import digest
from harness.models.llava_onevision import run_encoder
from harness.run.validate import check_method_family
from methods.core.base import ENCODER_NEEDS, EncoderStage, encoder_stage
from methods.core.flops import VisionShape, encoder_flops
from methods.tome import (
    ToMe,
    ToMePolicy,
    bipartite_soft_matching,
    merge_source,
    merge_wavg,
    merges_for,
    parse_r,
    planned_tokens,
)
from tests.reference import tome as ref
from tests.helpers.tolerance import close

QUESTION = "What colour is the moving square?\nA. red\nB. blue"
FRAMES = 2
SIGLIP = VisionShape(patches=729, layers=26, hidden=1152, ffn=4304, heads=16, tokens=196)  # LLaVA-OV's tower


def metric_and_x(batch: int, t: int, c: int, seed: int, distinct: int | None = None):
    """(metric (B, t, c), x (B, t, 5)) in float64; `distinct`: rows drawn from that many vectors
    (duplicate tokens: exact ties in the similarities)."""
    g = torch.Generator().manual_seed(seed)
    if distinct is None:
        metric = torch.randn(batch, t, c, generator=g, dtype=torch.float64)
    else:
        pool = torch.randn(distinct, c, generator=g, dtype=torch.float64)
        metric = pool[torch.randint(0, distinct, (batch, t), generator=g)]
    return metric, torch.randn(batch, t, 5, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The pure functions against the official code (float64: exact)

CASES = [(1, 10, 4, 3, None), (2, 729, 8, 340, None), (3, 31, 6, 100, None), (2, 50, 5, 0, None),
         (2, 64, 4, 20, 3), (1, 40, 3, 19, 1), (3, 97, 6, 30, 7)]


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("batch, t, c, r, distinct", CASES)
def test_matching_equals_the_official_code(batch, t, c, r, distinct, class_token):
    metric, x = metric_and_x(batch, t, c, seed=t + r, distinct=distinct)
    ours = bipartite_soft_matching(metric, r, class_token)
    theirs, _ = ref.bipartite_soft_matching(metric, r, class_token)
    for mode in ("sum", "mean", "amax", "amin"):
        assert torch.equal(ours(x, mode=mode), theirs(x, mode=mode))
    made = min(r, (t - class_token) // 2)
    assert ours(x).shape == (batch, t - made, 5)


@pytest.mark.parametrize("batch, t, c, r, distinct", CASES)
def test_size_weighted_merges_source_and_sizes_over_layers_equal_the_official_code(batch, t, c, r, distinct):
    """Three layers of merging: x, sizes and sources equal the official functions'; sizes are exact
    integers that count each token's sources, and every token is the mean of its source patches."""
    _, x0 = metric_and_x(batch, t, c, seed=1 + t, distinct=distinct)
    g = torch.Generator().manual_seed(r)
    ours_x, ours_size, ours_source = x0, None, None
    ref_x, ref_size, ref_source = x0, None, None
    origin = torch.arange(t).expand(batch, t)[..., None]
    for layer in range(3):
        metric = torch.randn(batch, ours_x.shape[1], c, generator=g, dtype=torch.float64)
        if distinct:  # coarse keys: ties (never a zero key, whose cosine the official code makes NaN)
            metric = metric.round()
            metric[..., 0] = 1.0
        merge = bipartite_soft_matching(metric, r)
        theirs, _ = ref.bipartite_soft_matching(metric, r)
        ours_source = merge_source(merge, ours_x, ours_source)
        ref_source = ref.merge_source(theirs, ref_x, ref_source)
        origin = merge(origin, mode="amin")
        ours_x, ours_size = merge_wavg(merge, ours_x, ours_size)
        ref_x, ref_size = ref.merge_wavg(theirs, ref_x, ref_size)
    assert torch.equal(ours_x, ref_x) and torch.equal(ours_size, ref_size)
    assert torch.equal(ours_source, ref_source.to(ours_source.dtype))
    assert torch.equal(ours_size[..., 0], ours_source.sum(-1).double())  # sizes count the sources
    assert torch.equal(ours_size, ours_size.round())
    torch.testing.assert_close(ours_x, ours_source.double() @ x0 / ours_size, **close(torch.float64, t, depth=3))
    # the smallest source patch, tracked with "amin", is the first patch of each source row
    assert torch.equal(origin[..., 0], ours_source.argmax(-1))


def test_ties_go_to_the_lower_index():
    # four identical A-tokens (positions 0, 2, 4, 6) and two identical B-tokens: every similarity is 1
    metric = torch.ones(1, 8, 3, dtype=torch.float64)
    x = torch.arange(8, dtype=torch.float64).view(1, 8, 1)
    merged = bipartite_soft_matching(metric, 2)(x, mode="sum")
    # A-tokens 0 and 2 (the first two) merge into B-token 1 (the first best match); 4 and 6 stay first
    assert merged.flatten().tolist() == [4.0, 6.0, 1.0 + 0.0 + 2.0, 3.0, 5.0, 7.0]


def test_order_is_unmerged_a_by_similarity_then_b():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.1], [0.0, 1.0]]],
                          dtype=torch.float64)
    x = torch.arange(6, dtype=torch.float64).view(1, 6, 1)
    merged = bipartite_soft_matching(metric, 1)(x, mode="amax")
    # A = (0, 2, 4): 0 and 2 match B exactly, 4 less so; 0 merges (first of the tie), then [2, 4] + B
    assert merged.flatten().tolist() == [2.0, 4.0, 1.0, 3.0, 5.0]


def test_zero_keys_have_cosine_zero_instead_of_nan():
    metric = torch.zeros(1, 6, 4)
    metric[0, 1] = 1.0
    merged = bipartite_soft_matching(metric, 2)(torch.arange(6.0).view(1, 6, 1), mode="sum")
    assert merged.isfinite().all() and merged.sum() == 15.0


def test_bfloat16_activations_keep_their_dtype_and_exact_sizes():
    metric, x = metric_and_x(2, 200, 4, seed=3)
    merge = bipartite_soft_matching(metric.bfloat16(), 90)
    merged, size = merge_wavg(merge, x.bfloat16())
    assert merged.dtype == torch.bfloat16 and size.dtype == torch.float32
    assert size.sum().item() == 400 and torch.equal(size, size.round())


@pytest.mark.parametrize("r", [0, 5, 16, (16, -1.0), (16, 1.0), (7, 0.5), [3, 2, 1], [5] * 30])
def test_parse_r_equals_the_official_schedule(r):
    for layers in (2, 12, 26):
        assert parse_r(layers, r) == ref.parse_r(layers, r)
    assert parse_r(1, 16) == [16]  # official: a division by zero


def test_retention_schedule_gives_k_tokens_per_frame_on_llava_onevision():
    for retention in (0.14, 0.15, 0.25, 0.5, 1.0):
        k = round(196 * retention)
        merges = merges_for(retention, 729, 26, 196)
        total = 729 - k
        assert merges == [total // 26 + (layer < total % 26) for layer in range(26)]
        made, tokens = planned_tokens(merges, 729)
        assert made == merges and tokens[-1][1] == k  # no cap binds for k >= 27
        assert [a for a, _ in tokens[1:]] == [m for _, m in tokens[:-1]]
    # below, the last layers cannot halve what is left: more than k tokens remain (reported)
    for retention, achieved in ((0.1, 24), (0.05, 19), (0.001, 15)):
        made, tokens = planned_tokens(merges_for(retention, 729, 26, 196), 729)
        assert tokens[-1][1] == achieved and made[-1] == tokens[-1][0] // 2


def test_the_cap_binds_on_a_shallow_encoder_and_the_achieved_k_is_reported():
    made, tokens = planned_tokens(merges_for(0.25, 729, 2, 196), 729)
    assert made == [340, 194] and tokens == [(729, 389), (389, 195)]
    tome = methods.build("tome", retention=0.25)
    tome.encoder_policy(VisionShape(729, 2, 32, 64, 2, 196))
    assert tome.notes() == {"tome_tokens_per_frame": 195, "tome_merges": [340, 194]}


def test_policy_gives_exactly_the_planned_tokens_per_frame():
    policy = methods.build("tome", retention=0.1).encoder_policy(SIGLIP)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 729, 8, generator=g)
    policy.start(hidden)
    assert policy.attention_bias(torch.float32) is None  # no bias before the first merge (official)
    for layer, (attention, mlp) in enumerate(policy.layer_tokens):
        assert hidden.shape[1] == attention
        hidden = policy.act(layer, hidden, torch.randn(3, attention, 4, generator=g))
        assert hidden.shape[1] == mlp
        bias = policy.attention_bias(torch.float32)
        assert bias.shape == (3, 1, 1, mlp) and torch.equal(bias, policy.size.log()[:, None, None, :, 0])
    out, origin = policy.finish(hidden)
    assert out.shape == (3, 24, 8) == (3, policy.layer_tokens[-1][1], 8)  # retention 0.1: 24 (caps)
    assert (origin.diff(dim=-1) > 0).all() and origin[:, 0].eq(0).all()  # patch 0 is always somewhere
    assert methods.build("tome", retention=0.25, prop_attn=False).encoder_policy(SIGLIP).attention_bias(
        torch.float32) is None


# ----------------------------------------------------------------------------------------------
# Knobs, registration, stacking, refusal


@pytest.mark.parametrize("knobs, message", [
    ({"retention": 0.0}, "tome.retention=0.0: expected a value in \\(0.0, 1.0\\] or null"),
    ({"retention": None}, "give exactly one of them"),
    ({"r": 8}, "give exactly one of them"),
    ({"retention": None, "r": -1}, "tome.r=-1: expected an integer in \\[0, inf\\] or null"),
    ({"inflection": -0.5}, "tome.inflection=-0.5: it shapes the schedule of r"),
    ({"prop_attn": "yes"}, "tome.prop_attn='yes': expected one of True, False"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("tome", **knobs)


def test_registered_in_the_encoder_stage_with_a_direct_retention_knob():
    tome = methods.build("tome")
    assert tome.stages == {"encoder"} and tome.retention_knob.knob == "retention" and tome.retention_knob.direct
    assert ToMe.defaults() == {"retention": 0.25, "r": None, "inflection": None, "prop_attn": True,
                               "class_token": False}
    assert tome.shares_prefix and not tome.reads_question_before_llm  # ToMe reads no question
    assert encoder_stage(tome.needs) is tome and not set(tome.needs) & ENCODER_NEEDS
    # the needs carry the setting: equal for equal knobs, different otherwise
    assert tome.needs == methods.build("tome").needs
    assert tome.needs != tome.with_knob("retention", 0.1).needs != methods.build("none").needs
    assert encoder_stage(tome.with_knob("retention", 0.1).needs).retention == 0.1
    assert tome.flops(4, 196, 896) is None
    official = methods.build("tome", retention=None, r=16, inflection=-1.0)
    assert official.schedule(SIGLIP) == parse_r(26, (16, -1.0))
    assert methods.build("tome", retention=None, r=16).schedule(SIGLIP) == [16] * 26


def test_labels_name_the_schedule():
    from harness.run.method import choose_method

    assert choose_method({"name": "tome"}, retention=0.25).label == "r=0.25"
    assert choose_method({"name": "tome", "retention": None, "r": 16, "inflection": -1.0}).label == "r=16,inflection=-1"


def test_pipeline_puts_the_encoder_stage_first():
    stack = methods.build("pipeline", stages=["tome", "fastv"], tome={"retention": 0.5})
    assert stack.stages == {"encoder", "prefill"} and stack.title == "tome+fastv"
    assert encoder_stage(stack.needs) is stack.parts[0] and stack.shares_prefix is False  # FastV reads it
    assert stack.retention_knob is None  # the search would not model the merging in the encoder
    assert isinstance(stack.encoder_policy(SIGLIP), ToMePolicy)
    assert methods.build("pipeline", stages=["tome", "uniform", "fastv"]).stages == {"encoder", "visual", "prefill"}
    with pytest.raises(ValueError, match="the encoder-stage method \\(tome\\) must come first"):
        methods.build("pipeline", stages=["fastv", "tome"])
    with pytest.raises(ValueError, match="the encoder-stage method \\(tome\\) then the visual-stage method "
                                         "\\(uniform\\) must come first"):
        methods.build("pipeline", stages=["uniform", "tome"])
    with pytest.raises(ValueError, match="no patch scores or states for topk"):
        methods.build("pipeline", stages=["tome", "topk"])


def test_refused_on_qwen2_5_vl_before_anything_loads():
    for method in (methods.build("tome"), methods.build("pipeline", stages=["tome", "fastv"])):
        with pytest.raises(ConfigError, match=re.escape(f"method {method.title} acts in the encoder stage, which "
                                                        "the model.family=qwen2_5_vl adapter does not run")) as err:
            check_method_family(method, "qwen2_5_vl")
        assert "\n" not in str(err.value)
    check_method_family(methods.build("tome"), "llava_onevision")


def test_the_qwen_adapter_refuses_it_too(qwen):
    with pytest.raises(ValueError, match="tome acts inside the vision encoder.*not defined for this family"):
        qwen.encode_video(torch.zeros(1), methods.build("tome").needs)


# ----------------------------------------------------------------------------------------------
# The encoder loop on the tiny LLaVA-OneVision


@pytest.fixture(scope="module")
def pixels(tiny_llava, smoke_questions):
    return tiny_llava.load_video(str(smoke_questions.parent / "videos" / "clip_003.mp4"), FRAMES)


def tower_of(adapter):
    tower = adapter.model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def attention_of(vision):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.siglip.modeling_siglip import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(vision.config._attn_implementation, eager_attention_forward)


def test_without_merges_the_loop_is_transformers_siglip_exactly(tiny_llava, pixels):
    vision = tower_of(tiny_llava)
    policy = methods.build("tome", retention=None, r=0).encoder_policy(tiny_llava.vision_shape)
    assert not policy.merging and policy.layer_tokens == [(729, 729)] * 2
    with torch.no_grad():
        ours, origin = run_encoder(vision, pixels, policy, tiny_llava.encoder_depth(), attention_of(vision))
        stock = tiny_llava.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[
            tiny_llava.config.vision_feature_layer]
    # the same modules and kernels on the same inputs in the same order: exact
    assert torch.equal(ours, stock) and torch.equal(origin, torch.arange(729).expand(FRAMES, 729))


@pytest.mark.parametrize("knobs", [{"retention": None, "r": 0}, {"retention": None, "r": 0, "prop_attn": False},
                                   {"retention": None, "r": 0, "inflection": 0.5}])
def test_keeping_everything_equals_none_exactly(tiny_llava, pixels, knobs):
    """r = 0 merges nothing: the tokens are the patch grid, pooled as the model pools them, so the
    features, the prompt and the logits are `none`'s, bit for bit (and so are the vision FLOPs)."""
    tome, none = methods.build("tome", **knobs), methods.build("none")
    ours, theirs = tiny_llava.encode_video(pixels, tome.needs), tiny_llava.encode_video(pixels, none.needs)
    assert torch.equal(ours.visual.features, theirs.visual.features) and ours.visual.grid == theirs.visual.grid
    assert torch.equal(ours.extras["newline"], theirs.extras["newline"])
    ids, _ = tiny_llava.prompt_ids(QUESTION)
    a, b = tiny_llava.prepare(ours, tome, ids), tiny_llava.prepare(theirs, none, ids)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.positions, b.positions) and a.span == b.span
    with torch.no_grad():
        assert torch.equal(tiny_llava.prefill(a, tome, use_cache=False).logits,
                           tiny_llava.prefill(b, none, use_cache=False).logits)
    assert a.run.video_tokens_in == a.run.video_tokens_out == FRAMES * 196
    assert tome.notes() == {"tome_tokens_per_frame": 196, "tome_merges": [0, 0]}
    assert tiny_llava.vision_flops(FRAMES, (14, 14), tome) == tiny_llava.vision_flops(FRAMES, (14, 14))


def test_retention_is_a_share_of_the_model_s_own_tokens_per_frame():
    """k = round(r N) with N the model's tokens per frame: 196 on LLaVA-OneVision, 64 on the micro model
    (224 px: 16x16 patches pooled to 8x8), whose 2 layers cannot halve 256 patches below 64."""
    tome = methods.build("tome", retention=0.5)
    micro = VisionShape(patches=256, layers=2, hidden=64, ffn=128, heads=2, tokens=64)
    assert tome.schedule(micro) == [112, 112]  # M = 256 - 32
    assert tome.encoder_policy(micro).layer_tokens == [(256, 144), (144, 72)]  # the cap: 72, not 32
    assert tome.notes()["tome_tokens_per_frame"] == 72
    assert tome.schedule(SIGLIP) == merges_for(0.5, 729, 26, 196) and sum(tome.schedule(SIGLIP)) == 729 - 98


@pytest.mark.parametrize("prop_attn", [True, False])
def test_merging_encoder_equals_the_official_tome_blocks(tiny_llava, pixels, prop_attn):
    """The adapter's loop (SDPA with the log-size mask) against the reference ToMe blocks (explicit
    softmax with log(size) added, the official ToMeAttention), both on a float64 copy of the tower."""
    vision = copy.deepcopy(tower_of(tiny_llava)).double()
    tome = methods.build("tome", retention=0.25, prop_attn=prop_attn)
    schedule = tome.schedule(tiny_llava.vision_shape)
    with torch.no_grad():
        ours, origin = run_encoder(vision, pixels.double(), tome.encoder_policy(tiny_llava.vision_shape), 2,
                                   attention_of(vision))
        theirs, first, size, _ = ref.tome_encoder(vision, pixels, list(schedule), 2, prop_attn)
    assert torch.equal(origin, first)  # the same merges, the same order
    torch.testing.assert_close(ours, theirs, **close(torch.float64, 729 + 64, depth=4))
    assert ours.shape == (FRAMES, 195, 32) and size.sum(dim=(1, 2)).eq(729).all()


def test_the_size_bias_is_the_official_proportional_attention(tiny_llava):
    layer = copy.deepcopy(tower_of(tiny_llava).encoder.layers[0]).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 32, generator=g, dtype=torch.float64)
    size = torch.randint(1, 9, (2, 50, 1), generator=g).double()
    policy = ToMePolicy([0], 50)
    policy.size = size
    attn = layer.self_attn
    q, k, v = (proj(x).view(2, 50, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out, _ = attention_of(tower_of(tiny_llava))(attn, q, k, v, policy.attention_bias(q.dtype), scaling=attn.scale,
                                                dropout=0.0, is_causal=False)
    ours = attn.out_proj(out.reshape(2, 50, -1))
    theirs, metric = ref.tome_attention(attn, x, size)
    torch.testing.assert_close(ours, theirs, **close(torch.float64, 50 + 32))
    assert torch.equal(metric, k.mean(1))


def test_the_llm_gets_k_merged_tokens_per_frame_in_patch_order(tiny_llava, pixels):
    tome = methods.build("tome", retention=0.25)
    encoded = tiny_llava.encode_video(pixels, tome.needs)
    assert encoded.visual.features.shape == (FRAMES, 195, 64) and encoded.visual.grid == (1, 195)
    text, run = tiny_llava.generate(encoded, QUESTION, tome, max_new_tokens=2)
    assert isinstance(text, str)
    assert run.video_tokens_in == FRAMES * 196 and run.video_tokens_out == FRAMES * 195
    assert run.frame_tokens == 195 and run.layer_video_tokens == [FRAMES * 195] * tiny_llava.llm_shape.layers
    ids, _ = tiny_llava.prompt_ids(QUESTION)
    prompt = tiny_llava.prepare(encoded, tome, ids)
    start, end = prompt.span
    # the merged features at consecutive positions, then the newline
    assert torch.equal(prompt.embeds[0, start:end], encoded.visual.features.flatten(0, 1))
    assert torch.equal(prompt.positions[0], torch.arange(prompt.embeds.shape[1]))
    assert tome.notes()["tome_tokens_per_frame"] == 195
    with pytest.raises(ValueError, match="no per-patch patch_scores to give"):
        tiny_llava.encode(pixels, tome.needs | {"patch_scores"})


def test_vision_flops_count_the_merged_layers(tiny_llava):
    tome = methods.build("tome", retention=0.25)
    vision = tiny_llava.config.vision_config
    dense = tiny_llava.vision_flops(FRAMES, (14, 14))
    merged = tiny_llava.vision_flops(FRAMES, (1, 195), tome)
    assert merged < dense == encoder_flops(vision, FRAMES, 64)
    assert merged == encoder_flops(vision, FRAMES, 64, [(729, 389), (389, 195)])
    side, width, ffn = 27, 32, 64
    by_hand = (2 * 729 * 3 * 14 ** 2 * width + 4 * 729 * width ** 2 + 2 * 729 ** 2 * width + 2 * 389 * width * ffn
               + 4 * 389 * width ** 2 + 2 * 389 ** 2 * width + 2 * 195 * width * ffn + 2 * 195 * (width + 64) * 64)
    assert side * side == 729 and merged == FRAMES * by_hand


# ----------------------------------------------------------------------------------------------
# Nothing else changes: other methods' features and cache keys


def test_every_other_method_s_features_are_the_stock_model_s(tiny_llava, pixels):
    with torch.no_grad():
        stock = tiny_llava.model.model.get_video_features(
            pixel_values_videos=pixels[None], vision_feature_layer=tiny_llava.config.vision_feature_layer,
            vision_feature_select_strategy="full").pooler_output[0]
    for needs in {frozenset(methods.build(n).needs) for n in methods.known() if n not in ("pipeline", "tome")}:
        encoded = tiny_llava.encode_video(pixels, needs)
        assert torch.equal(encoded.visual.features.flatten(0, 1), stock[:-1])
        assert torch.equal(encoded.extras["newline"], stock[-1:])


def test_the_cache_key_holds_the_encoder_stage_and_nothing_else_changes(tiny_llava, smoke_questions, tmp_path):
    video = str(smoke_questions.parent / "videos" / "clip_001.mp4")
    cache = FeatureCache(tmp_path, tiny_llava.fingerprint)
    p = tiny_llava.preprocessing
    for needs in (frozenset(), frozenset({"patch_scores"}), frozenset({"encoder_hidden", "question"})):
        st = os.stat(video)
        before = digest({"model": tiny_llava.fingerprint, "video": os.path.realpath(video), "size": st.st_size,
                         "mtime": st.st_mtime_ns, "frames": 4, "pre": vars(p),
                         "needs": sorted(set(needs) & ENCODER_NEEDS), "version": 3})
        assert cache.key(video, 4, p, needs) == before  # every other method's entries keep their keys
    tome = methods.build("tome", retention=0.25)
    keys = {cache.key(video, 4, p, m.needs) for m in (tome, tome.with_knob("retention", 0.1),
                                                      methods.build("tome", retention=0.25, prop_attn=False),
                                                      methods.build("none"))}
    assert len(keys) == 4
    assert cache.key(video, 4, p, methods.build("tome", retention=0.25).needs) == cache.key(video, 4, p, tome.needs)
    stack = methods.build("pipeline", stages=["tome", "fastv"], tome={"retention": 0.25})
    assert cache.key(video, 4, p, stack.needs) == cache.key(video, 4, p, tome.needs)  # whatever follows it
    encoded = tiny_llava.encode_video(tiny_llava.load_video(video, 4), tome.needs)
    cache.save(cache.key(video, 4, p, tome.needs), encoded)
    loaded = cache.load(cache.key(video, 4, p, tome.needs), "cpu")
    assert torch.equal(loaded.visual.features, encoded.visual.features) and loaded.visual.grid == (1, 195)
    assert tiny_llava.compress(loaded, tome).full == 4 * 196
    assert cache.load(cache.key(video, 4, p, methods.build("none").needs), "cpu") is None  # never served to none
    # served from the cache, the method is still planned on this encoder: its notes do not depend on the cache
    fresh = methods.build("tome", retention=0.25)
    read = read_input(tiny_llava, video, 4, fresh.needs, cache)
    assert read.encoded is not None and fresh.notes() == {}
    assert encode_input(tiny_llava, read, fresh.needs, cache) is read.encoded
    assert fresh.notes() == {"tome_tokens_per_frame": 195, "tome_merges": [340, 194]}


def test_encoder_stage_members_compare_by_setting():
    a, b = EncoderStage(methods.build("tome")), EncoderStage(methods.build("tome"))
    assert a == b and hash(a) == hash(b) and a != EncoderStage(methods.build("tome", retention=0.5))
    assert "question" not in frozenset({a}) and encoder_stage(frozenset({"patch_scores"})) is None


# ----------------------------------------------------------------------------------------------
# In the harness (slow)


@pytest.mark.slow
def test_runs_in_the_harness(cfg_factory):
    from harness.errors import ConfigError
    from tests.helpers import run_config

    # the tiny model's 2 SigLIP layers can halve twice: no retention target is within reach
    with pytest.raises(ConfigError, match=r"retention=0.25: unreachable on this model; tome keeps 99.49% "
                                          r"of the 196 tokens per frame there and at least 93.37%"):
        run_config(cfg_factory("+method=tome", "retention=0.25", "task.limit=2"))
    # the official knob instead: r = 340 merges per layer, capped at half of what is left
    summary = json.loads((run_config(cfg_factory("+method=tome", "method.retention=null", "method.r=340",
                                                 "task.limit=2")) / "summary.json").read_text())
    assert summary["method"] == "tome" and summary["knobs"]["r"] == 340
    assert summary["stages"] == ["encoder"]
    # the tiny model's 2 SigLIP layers can halve twice: 195 of 196 tokens per frame reach the LLM
    assert summary["retention"]["rho_tok"]["mean"] == pytest.approx(195 / 196)
    assert summary["method_notes"] == {"tome_tokens_per_frame": 195, "tome_merges": [340, 194]}


@pytest.mark.slow
def test_a_stack_with_fastv_runs_in_the_harness(cfg_factory):
    from tests.helpers import run_config

    summary = json.loads((run_config(cfg_factory("+method=pipeline", "method.stages=[tome,fastv]",
                                                 "+method.tome.retention=0.25", "task.limit=2"))
                          / "summary.json").read_text())
    assert summary["method"] == "tome+fastv" and summary["stages"] == ["encoder", "prefill"]
    assert summary["retention"]["rho_visual"]["mean"] == pytest.approx(195 / 196)
    assert summary["retention"]["rho_tok"]["mean"] < 195 / 196
