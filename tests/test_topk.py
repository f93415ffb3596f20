"""Attention-score top-k: the scores are the encoder's real attention, the selection is as documented."""

import pytest
import torch

import methods
from harness.models.llava_onevision import LlavaOneVision
from methods.core.base import VisualInput
from methods.core.select import top_k_ascending
from methods.topk import pooled_scores
from tests.helpers.tolerance import bound, close_probabilities


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


def test_patch_scores_equal_the_eager_attention_of_the_used_layer(adapter, tiny_model_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    pixels = torch.randn(2, 3, 384, 384)
    visual = adapter.encode(pixels, needs=frozenset({"patch_scores"})).visual
    eager = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(tiny_model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True)
    layer = adapter.config.vision_feature_layer % (len(out.attentions) + 1) - 1
    expected = out.attentions[layer].mean(dim=(1, 2))  # (F, P): mean over heads and queries
    # the adapter's recomputed row (on the SDPA tower's layer input) against the eager weights:
    # the layer before in another kernel, softmax rows over the 729 patches, their mean over
    # the 729 queries (tests/helpers/tolerance.py)
    torch.testing.assert_close(visual.patch_scores, expected, **close_probabilities(torch.float32, 729, depth=3))
    # the features were computed with the fast kernel, unchanged by the scoring: exact
    assert adapter.model.model.vision_tower.config._attn_implementation == "sdpa"
    plain = adapter.encode(pixels).visual
    assert torch.equal(visual.features, plain.features)


def test_known_scores_select_the_expected_tokens():
    # a ramp over columns (slightly falling over rows) stays one after bilinear pooling:
    # the right-most column wins, its top rows first
    rows, cols = torch.meshgrid(torch.arange(27.0), torch.arange(27.0), indexing="ij")
    ramp = (cols - 1e-3 * rows).flatten()[None].repeat(2, 1)  # (F=2, 729)
    features = torch.randn(2, 196, 4)
    out = methods.build("topk", retention=5 / 196).compress(VisualInput(features, (14, 14), ramp))
    expected = [13, 27, 41, 55, 69]  # column 13, rows 0-4
    assert torch.equal(out, features[:, expected].flatten(0, 1))  # the kept features, copied: exact
    out = methods.build("topk", retention=42 / 196).compress(VisualInput(features, (14, 14), ramp))
    kept = sorted(r * 14 + c for r in range(14) for c in (11, 12, 13))
    assert torch.equal(out, features[:, kept].flatten(0, 1))


def test_equal_scores_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    assert top_k_ascending(scores, 2).tolist() == [[1, 2]]
    assert top_k_ascending(scores, 4).tolist() == [[1, 2, 3, 4]]
    assert top_k_ascending(torch.zeros(1, 5), 3).tolist() == [[0, 1, 2]]


def test_pooled_scores_use_the_feature_pooling():
    """Bilinear resizing (align_corners=False, as OneVision pools its features 27x27 -> 14x14)
    keeps a linear map linear: output (i, j) samples the input at ((i + .5) 27/14 - .5, ...)."""
    rows, cols = torch.meshgrid(torch.arange(27.0), torch.arange(27.0), indexing="ij")
    scores = torch.stack([rows + 2 * cols, 3 * rows - cols, torch.full((27, 27), 5.0)]).flatten(1)
    pooled = pooled_scores(scores, (14, 14))
    src = (torch.arange(14.0) + 0.5) * 27 / 14 - 0.5
    r, c = torch.meshgrid(src, src, indexing="ij")
    expected = torch.stack([r + 2 * c, 3 * r - c, torch.full((14, 14), 5.0)]).flatten(1)
    # the resize's float32 taps against the map evaluated at float32 source coordinates: a coordinate
    # of up to 27, a few operations deep (scale, product, offset) in rows and columns, moves by
    # that bound, the value by it times the map's step between neighbours (at most 3)
    tol = bound(torch.float32, 27, depth=6)
    torch.testing.assert_close(pooled, expected, rtol=tol, atol=3 * tol)


def test_full_retention_equals_none(adapter):
    visual = adapter.encode(torch.randn(2, 3, 384, 384), needs=frozenset({"patch_scores"})).visual
    # both keep every feature in order, copied: exact
    assert torch.equal(methods.build("topk", retention=1.0).compress(visual),
                       methods.build("none").compress(visual).tokens)


def test_keeps_k_per_frame_in_original_order():
    scores = torch.rand(4, 729)
    features = torch.arange(4 * 196, dtype=torch.float32).view(4, 196, 1)
    out = methods.build("topk", retention=0.1).compress(VisualInput(features, (14, 14), scores))
    k = round(0.1 * 196)
    assert out.shape == (4 * k, 1)
    per_frame = out.view(4, k)
    assert bool((per_frame.diff(dim=1) > 0).all())  # original order within each frame
    for f in range(4):
        assert bool(((per_frame[f] >= f * 196) & (per_frame[f] < (f + 1) * 196)).all())


def test_patch_keys_and_encoder_hidden_are_the_encoder_s_own(adapter):
    pixels = torch.randn(2, 3, 384, 384)
    visual = adapter.encode(pixels, needs=frozenset({"patch_scores", "encoder_hidden"})).visual
    tower = adapter.model.model.vision_tower
    with torch.no_grad():
        states = tower(pixels, output_hidden_states=True).hidden_states
        chosen = adapter.config.vision_feature_layer
        layer = adapter.scoring_layer()
        index = chosen % len(states) - 1  # hidden_states[k] is the input of layer k
        keys = layer.self_attn.k_proj(layer.layer_norm1(states[index]))
    heads = layer.self_attn.num_heads
    # the same projection of the same layer input, then the mean of the (2) heads, the same in any
    # order: exact
    torch.testing.assert_close(visual.patch_keys, keys.view(2, 729, heads, -1).mean(2), rtol=0, atol=0)
    assert torch.equal(visual.encoder_hidden, states[chosen])  # what the projector receives: the same tower's
    plain = adapter.encode(pixels).visual
    assert plain.patch_keys is None and plain.encoder_hidden is None
