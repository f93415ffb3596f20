"""The shared decoder driver (methods/core/decoder.py) against the stock transformers model.

References here never call the driver: they run the stock Qwen2 model (its own forward, with
explicit position ids and 4-D masks where the driver keeps positions or hides entries).
"""

from contextlib import contextmanager

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.models.llava_onevision import LlavaOneVision
from methods.core import decoder
from methods.core.base import Compressor, VideoTokens
from methods.core.decoder import Keep
from tests.helpers.tolerance import bound, close, close_probabilities

FRAMES = 2
LAYERS = 8  # decoder layers of the tiny smoke model
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_005.mp4", FRAMES),
                      p.size, p.mean, p.std)


class EveryThird(Compressor):
    """A visual stage keeping every third token at its original position (test double)."""

    name = "every_third"
    stages = frozenset({"visual"})

    def compress(self, x):
        flat = x.features.flatten(0, 1)
        keep = torch.arange(0, flat.shape[0], 3)
        return VideoTokens(flat[keep], keep)


def causal(n, hidden_from=None, rows=None):
    """(1, 1, n, n) bool mask: causal, with keys `hidden_from` hidden from the query rows `rows`."""
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    if hidden_from is not None:
        mask[torch.as_tensor(rows)[:, None], torch.as_tensor(hidden_from)[None, :]] = False
    return mask[None, None]


def stock_logits(adapter, embeds, positions, mask, layers=None):
    """The stock Qwen2 forward (optionally on a slice of its layers) + the LM head."""
    lm = adapter.model.model.language_model
    with sliced(lm, layers), torch.no_grad():
        hidden = lm(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                    use_cache=False).last_hidden_state
    return adapter.model.lm_head(hidden)


@contextmanager
def sliced(lm, layers):
    if layers is None:
        yield
        return
    full, depth = lm.layers, lm.config.num_hidden_layers
    lm.layers = torch.nn.ModuleList(list(full)[layers])
    lm.config.num_hidden_layers = len(lm.layers)
    try:
        yield
    finally:
        lm.layers, lm.config.num_hidden_layers = full, depth


def test_kept_original_positions_reach_the_llm_and_decoding(adapter, pixels):
    compressor = EveryThird()
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    start, end = prompt.span
    full = FRAMES * 196
    positions = prompt.positions[0]
    assert positions[start:end].tolist() == [start + i for i in range(0, full, 3)]
    assert positions[end].item() == start + full  # the newline sits where it would uncompressed
    assert positions[-1].item() == len(ids) - 1 + full  # as does the text after it
    out = adapter.prefill(prompt, compressor, use_cache=True)
    n = prompt.embeds.shape[1]
    expected = stock_logits(adapter, prompt.embeds, prompt.positions, causal(n))
    # the driver's prefill against the stock forward: attention sums over n keys, in each of
    # LAYERS layers (tests/helpers/tolerance.py)
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, n, depth=LAYERS))
    # a decode step continues after the last original position
    token = out.logits[0, -1].argmax().view(1, 1)
    step = decoder.decode(adapter.llm, out.state, token)
    embeds = torch.cat([prompt.embeds, adapter.model.get_input_embeddings()(token)], 1)
    pos = torch.cat([prompt.positions, prompt.positions[:, -1:] + 1], 1)
    expected = stock_logits(adapter, embeds, pos, causal(n + 1))[:, -1:]
    # cached decode against an uncached stock recompute: n + 1 keys, LAYERS layers
    torch.testing.assert_close(step, expected, **close(torch.float32, n + 1, depth=LAYERS))


class HideEveryOther:
    """A decode policy hiding every other cached video entry from layer `layer` on."""

    def __init__(self, layer):
        self.layer, self.calls = layer, 0

    def select(self, view):
        self.calls += 1
        attention = view.attention()  # over the layer's cache entries and the new token
        assert attention.ndim == 1 and attention.shape[0] > int(view.video.max()) + 1
        # a float32 softmax and its sum, each over the row's entries
        assert float(attention.sum()) == pytest.approx(1.0, abs=bound(torch.float32, attention.shape[0], depth=2))
        chosen = torch.zeros(len(view.video), dtype=torch.bool)
        chosen[::2] = True
        return chosen


@pytest.mark.parametrize("layer", [0, 3, 7])
def test_decode_policy_hides_entries_from_its_layer_on(adapter, pixels, layer):
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    start, end = prompt.span
    out = adapter.prefill(prompt, none, use_cache=True)
    policy = HideEveryOther(layer)
    embeds, tokens = prompt.embeds, []
    token = out.logits[0, -1].argmax().view(1, 1)
    lm = adapter.model.model.language_model
    for step in range(3):
        logits = decoder.decode(adapter.llm, out.state, token, policy)
        embeds = torch.cat([embeds, adapter.model.get_input_embeddings()(token)], 1)
        tokens.append(int(token))
        n = embeds.shape[1]
        hidden = list(range(start + 1, end, 2))  # odd video entries
        rows = list(range(n - step - 1, n))  # the generated tokens' rows
        masks = {True: causal(n, hidden, rows), False: causal(n)}

        def hook(module, args, kwargs):
            kwargs["attention_mask"] = masks[module.self_attn.layer_idx >= layer]
            return args, kwargs

        handles = [l.register_forward_pre_hook(hook, with_kwargs=True) for l in lm.layers]
        try:
            expected = stock_logits(adapter, embeds, torch.arange(n)[None], causal(n))[:, -1:]
        finally:
            for h in handles:
                h.remove()
        # cached, masked decode against an uncached stock recompute: n keys, LAYERS layers
        torch.testing.assert_close(logits, expected, **close(torch.float32, n, depth=LAYERS))
        token = logits[0, -1].argmax().view(1, 1)
    assert policy.calls == 3
    assert out.state.decode_video_visible == [0.5] * 3


def test_step_attention_is_the_eager_attention_row(adapter, pixels):
    """DecodeView.attention equals the eager model's attention of the new token at that layer."""
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    out = adapter.prefill(prompt, none, use_cache=True)
    seen = {}

    class Record:
        layer = 3

        def select(self, view):
            seen["attention"], seen["before"] = view.attention(), view.attention(layer=2)
            return None

    token = out.logits[0, -1].argmax().view(1, 1)
    decoder.decode(adapter.llm, out.state, token, Record())
    eager = LlavaOneVision(adapter_path(adapter), attn_implementation="eager")
    embeds = torch.cat([prompt.embeds, adapter.model.get_input_embeddings()(token)], 1)
    with torch.no_grad():
        weights = eager.model(inputs_embeds=embeds, output_attentions=True).attentions
    # the decode step's attention row (cache + recomputed row) against the eager full forward's:
    # softmax rows over n keys after the layers up to and including the one read
    n = embeds.shape[1]
    torch.testing.assert_close(seen["attention"], weights[3][0, :, -1].mean(0),
                               **close_probabilities(torch.float32, n, depth=4))
    torch.testing.assert_close(seen["before"], weights[2][0, :, -1].mean(0),
                               **close_probabilities(torch.float32, n, depth=3))
    assert out.state.decode_video_visible == [1.0]


def adapter_path(adapter):
    return adapter.model.name_or_path


class MergePairs:
    """Before layer `layer`, keep the even video tokens, each averaged with its odd neighbour."""

    def __init__(self, layer):
        self.layers = (layer,)

    def act(self, view):
        h = view.hidden[0, view.video]
        pairs = h[: len(h) // 2 * 2].view(-1, 2, h.shape[-1])
        return Keep(torch.arange(0, len(pairs) * 2, 2), pairs.mean(1))

    def planned(self, video_tokens, groups=None):
        return None


@pytest.mark.parametrize("layer", [1, 4])
def test_prefill_merge_continues_on_the_merged_states_at_original_positions(adapter, pixels, layer):
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    start, end = prompt.span
    out = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, MergePairs(layer),
                          use_cache=True)
    # reference: the stock model's hidden state entering `layer`, merged by hand, then the stock
    # forward over the remaining layers at the kept tokens' original positions
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=prompt.embeds, output_hidden_states=True).hidden_states[layer]
    video = h[0, start:end]
    merged = video.view(-1, 2, video.shape[-1]).mean(1)
    kept = torch.cat([torch.arange(start), torch.arange(start, end, 2), torch.arange(end, h.shape[1])])
    h = h[:, kept].clone()
    h[0, start:start + len(merged)] = merged
    expected = stock_logits(adapter, h, kept[None], causal(len(kept)), slice(layer, None))
    # the driver's merged prefill against the stock forward merged by hand: attention sums over at
    # most the prompt's keys, in each of LAYERS layers
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, prompt.embeds.shape[1], depth=LAYERS))
    assert out.layer_video_tokens == [end - start] * layer + [(end - start) // 2] * (8 - layer)
    assert out.layer_mlp_video_tokens == out.layer_video_tokens  # an act before a layer: both see it
    assert out.kept.tolist() == kept.tolist()
    # the cache of each layer holds what that layer saw
    assert [l.keys.shape[-2] for l in out.state.cache.layers] == (
        [prompt.embeds.shape[1]] * layer + [len(kept)] * (8 - layer))


class DropOddMid:
    """Between layer `layer`'s attention and MLP, drop the odd video tokens; records attention."""

    def __init__(self, layer):
        self.layers, self.mid_layers, self.seen = (), (layer,), {}

    def act(self, view):
        assert view.mid
        self.seen["attention"] = view.attention()  # this layer's own attention (the one just run)
        return Keep(torch.arange(0, len(view.video), 2))

    def planned(self, video_tokens, groups=None):
        return None


@pytest.mark.parametrize("layer", [0, 5])
@pytest.mark.slow
def test_mid_layer_drop_runs_the_mlp_on_the_kept_tokens(adapter, pixels, layer, tiny_model_dir):
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    start, end = prompt.span
    policy = DropOddMid(layer)
    out = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, policy, use_cache=True)
    # reference: norms and MLP act per token, so the layer's output on the kept rows is the stock
    # layer's output at those rows; the stock forward then continues from the next layer
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=prompt.embeds, output_hidden_states=True).hidden_states[layer + 1]
    kept = torch.cat([torch.arange(start), torch.arange(start, end, 2), torch.arange(end, h.shape[1])])
    expected = stock_logits(adapter, h[:, kept], kept[None], causal(len(kept)), slice(layer + 1, None))
    # the driver's prefill against the stock forward restarted at the kept rows: attention sums
    # over at most the prompt's keys, in each of LAYERS layers
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, prompt.embeds.shape[1], depth=LAYERS))
    # the layer's cache holds every token (its attention saw them), later layers only the kept
    assert [l.keys.shape[-2] for l in out.state.cache.layers] == (
        [prompt.embeds.shape[1]] * (layer + 1) + [len(kept)] * (7 - layer))
    # the counts: the layer's attention saw every video token, its MLP the kept half
    video, half = end - start, len(range(0, end - start, 2))
    assert out.layer_video_tokens == [video] * (layer + 1) + [half] * (7 - layer)
    assert out.layer_mlp_video_tokens == [video] * layer + [half] * (8 - layer)
    text = prompt.embeds.shape[1] - video
    assert [l.keys.shape[-2] for l in out.state.cache.layers] == [text + v for v in out.layer_video_tokens]
    eager = LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")
    with torch.no_grad():
        weights = eager.model(inputs_embeds=prompt.embeds, output_attentions=True).attentions[layer]
    # the driver's recomputed attention row against the eager forward's: softmax rows over the
    # prompt's keys after layers 0..layer
    torch.testing.assert_close(policy.seen["attention"][0], weights[0, :, -1].mean(0),
                               **close_probabilities(torch.float32, prompt.embeds.shape[1], depth=layer + 1))


def test_a_policy_may_read_the_attention_of_the_layer_it_precedes(adapter, pixels, tiny_model_dir):
    seen = {}

    class Look:
        layers = (3,)

        def act(self, view):
            seen["own"], seen["previous"] = view.attention(layer=3), view.attention()
            return None

    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    out = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, Look(), use_cache=False)
    eager = LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")
    with torch.no_grad():
        weights = eager.model(inputs_embeds=prompt.embeds, output_attentions=True).attentions
    # the driver's recomputed attention rows against the eager forward's: softmax rows over n keys
    # after the layers up to and including the one read
    n = prompt.embeds.shape[1]
    torch.testing.assert_close(seen["own"][0], weights[3][0, :, -1].mean(0),
                               **close_probabilities(torch.float32, n, depth=4))
    torch.testing.assert_close(seen["previous"][0], weights[2][0, :, -1].mean(0),
                               **close_probabilities(torch.float32, n, depth=3))
    assert out.layer_video_tokens == [FRAMES * 196] * 8  # a policy that keeps everything


def test_visual_groups_follow_the_tokens_into_the_policy(adapter, pixels):
    class Grouped(Compressor):
        name = "grouped"
        stages = frozenset({"visual", "prefill"})

        def compress(self, x):
            flat = x.features.flatten(0, 1)
            keep = torch.arange(0, flat.shape[0], 2)
            return VideoTokens(flat[keep], keep, groups=keep % 7)

        def prefill_policy(self, llm):
            return self

        layers = (2, 5)
        seen = []

        def act(self, view):
            self.seen.append(view.groups.clone())
            return Keep(torch.arange(0, len(view.video), 3))

    method = Grouped()
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, method, ids)
    adapter.prefill(prompt, method, use_cache=False)
    first, second = method.seen
    assert first.tolist() == [i % 7 for i in range(0, FRAMES * 196, 2)]
    assert second.tolist() == first[::3].tolist()  # groups follow the kept tokens


# ---- compacted positions, reordered entries, keys and the final norm (STTM, SparseVLM, DART) ------------
class MergePairsCompact(MergePairs):
    """MergePairs, then the sequence takes the ids 0..n-1; decode steps as `decode_positions` says."""

    def __init__(self, layer, decode_positions="prompt"):
        super().__init__(layer)
        self.decode_positions = decode_positions

    def act(self, view):
        keep = super().act(view)
        return Keep(keep.video, keep.hidden, compact=True)


def merged_reference(adapter, embeds, span, layer, prompt, new_positions):
    """Stock logits when layers < `layer` run on every entry at 0..n-1 and layers >= `layer` on the
    prompt's first `prompt` entries with their video pairs averaged (at 0..M-1), then the entries
    after the prompt at `new_positions`."""
    start, end = span
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
    video = h[0, start:end]
    merged = video.view(-1, 2, video.shape[-1]).mean(1)
    h = torch.cat([h[:, :start], merged[None], h[:, end:prompt], h[:, prompt:]], 1)
    m = prompt - (end - start) + len(merged)
    positions = torch.cat([torch.arange(m), torch.as_tensor(new_positions, dtype=torch.long)])[None]
    return stock_logits(adapter, h, positions, causal(h.shape[1]), slice(layer, None))


@pytest.mark.parametrize("rule", ["prompt", "cache"])
def test_compacted_positions_in_prefill_and_both_decode_rules(adapter, pixels, rule):
    layer = 2
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    span, total = prompt.span, prompt.embeds.shape[1]
    out = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, span,
                          MergePairsCompact(layer, rule), use_cache=True)
    m = total - (span[1] - span[0]) // 2
    # the driver's compacted prefill against the stock forward merged by hand: attention sums over
    # at most `total` keys, in each of LAYERS layers
    torch.testing.assert_close(out.logits, merged_reference(adapter, prompt.embeds, span, layer, total, []),
                               **close(torch.float32, total, depth=LAYERS))
    state = out.state
    assert state.position_shift == [0] * layer + [total - m] * (8 - layer)
    assert state.decode_compact == (rule == "cache")
    token = out.logits[0, -1].argmax().view(1, 1)
    embeds = prompt.embeds
    for step in range(2):
        logits = decoder.decode(adapter.llm, state, token)
        embeds = torch.cat([embeds, adapter.model.get_input_embeddings()(token)], 1)
        after = list(range(total, total + step + 1)) if rule == "prompt" else list(range(m, m + step + 1))
        expected = merged_reference(adapter, embeds, span, layer, total, after)[:, -1:]
        # cached decode against an uncached stock recompute: at most total + step + 1 keys, LAYERS layers
        torch.testing.assert_close(logits, expected, **close(torch.float32, total + step + 1, depth=LAYERS))
        token = logits[0, -1].argmax().view(1, 1)


def test_a_compacted_prefix_continued_equals_one_prefill(adapter, pixels):
    """`extend` places the question after each layer's compacted prefix, as one prefill does."""
    layer = 3
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    span = prompt.span
    whole = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, span, MergePairsCompact(layer),
                            use_cache=False)
    length = span[1] + 1  # the video and the newline after it
    head = decoder.prefill(adapter.llm, prompt.embeds[:, :length], prompt.positions[:, :length], span,
                           MergePairsCompact(layer), use_cache=True, logits_to_keep=1)
    mark = head.state.mark()
    rest = decoder.extend(adapter.llm, head.state, prompt.embeds[:, length:], prompt.positions[:, length:])
    cut = len(whole.kept) - (prompt.embeds.shape[1] - length)
    # a cached prefix extended against one uncached prefill: attention sums over at most the
    # prompt's keys, in each of LAYERS layers
    torch.testing.assert_close(rest, whole.logits[:, cut:],
                               **close(torch.float32, prompt.embeds.shape[1], depth=LAYERS))
    head.state.rewind(mark)
    assert head.state.cache.get_seq_length() == head.state.cache.layers[0].keys.shape[-2] == length
    assert head.state.next_position.item() == length  # decoding continues the unmerged numbering


class ReverseEvenVideo:
    """Before layer `layer`, keep the even video tokens and put them in reverse order."""

    def __init__(self, layer):
        self.layers = (layer,)

    def act(self, view):
        kept = torch.arange(0, len(view.video), 2)
        return Keep(kept, order=torch.arange(len(kept) - 1, -1, -1))

    def planned(self, video_tokens, groups=None):
        return None


def test_reordered_video_entries_keep_their_positions_and_origins(adapter, pixels):
    layer = 2
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    (start, end), total = prompt.span, prompt.embeds.shape[1]
    out = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, ReverseEvenVideo(layer),
                          use_cache=True)
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=prompt.embeds, output_hidden_states=True).hidden_states[layer]
    order = torch.cat([torch.arange(start), torch.arange(start, end, 2).flip(0), torch.arange(end, total)])
    expected = stock_logits(adapter, h[:, order], order[None], causal(len(order)), slice(layer, None))
    # the driver's reordered prefill against the stock forward on the reordered states: attention
    # sums over at most `total` keys, in each of LAYERS layers
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, total, depth=LAYERS))
    assert out.kept.tolist() == order.tolist()
    assert out.state.layer_origin[layer].tolist() == order.tolist()
    assert out.state.position_shift is None  # nothing compacted


def test_prefill_view_reads_keys_and_the_final_norm(adapter, pixels):
    seen = {}

    class Look:
        layers = (3,)

        def act(self, view):
            seen["keys"], seen["normed"], seen["hidden"] = view.keys(), view.final_norm(), view.hidden
            return None

    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, Look(), use_cache=False)
    lm = adapter.model.model.language_model
    with torch.no_grad():
        out = lm(inputs_embeds=prompt.embeds, use_cache=True)
    keys = out.past_key_values.layers[2].keys[0]  # layer 2 = the one before the policy's layer
    # the view's keys (recomputed from the driver's layer-2 input) against the stock cache's: attention
    # sums over the prompt's keys in layers 0 and 1, then layer 2's key projection
    torch.testing.assert_close(seen["keys"], keys.transpose(0, 1).reshape(keys.shape[1], -1),
                               **close(torch.float32, prompt.embeds.shape[1], depth=3))
    # the same norm on the same states: exact
    assert torch.equal(seen["normed"], lm.norm(seen["hidden"]))


def test_compacting_m_rope_positions_is_refused(qwen, smoke_questions):
    class Compact:
        layers = (2,)

        def act(self, view):
            return Keep(torch.arange(len(view.video)), compact=True)

    none = methods.build("none")
    pixels = qwen.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)
    prompt = qwen.prepare(pixels, none, qwen.prompt_ids(QUESTION)[0])
    with pytest.raises(ValueError, match=r"compacted positions need 1-D position ids"):
        decoder.prefill(qwen.llm, prompt.embeds, prompt.positions, prompt.span, Compact(), use_cache=False)


# ---- text between video tokens (video_mask) and DeepStack features --------------------------------
class KeepEvenVideo:
    """Before layer `layer`, keep the video tokens of even index; records what it was shown."""

    def __init__(self, layer):
        self.layers, self.seen = (layer,), {}

    def act(self, view):
        self.seen = {"video": view.video.clone(), "index": view.video_index.clone(), "origin": view.origin.clone()}
        return Keep(torch.arange(0, len(view.video), 2))

    def planned(self, video_tokens, groups=None):
        return None


def holes(span, every=10):
    """(end - start,) bool: every `every`-th entry inside the span (not its ends) marked as text."""
    mask = torch.ones(span[1] - span[0], dtype=torch.bool)
    mask[every:-1:every] = False
    return mask


def test_a_full_video_mask_changes_nothing(adapter, pixels):
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    full = torch.ones(prompt.span[1] - prompt.span[0], dtype=torch.bool)
    plain = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, KeepEvenVideo(3),
                            use_cache=False)
    masked = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, KeepEvenVideo(3),
                             use_cache=False, video_mask=full)
    # the same layers on the same entries in the same order: exact
    assert torch.equal(plain.logits, masked.logits) and torch.equal(plain.kept, masked.kept)
    assert plain.layer_video_tokens == masked.layer_video_tokens


def test_text_inside_the_span_is_never_a_video_token(adapter, pixels):
    """Entries of the span a video mask marks as text (timestamps between frames) are kept in place
    whatever a policy does, never offered to it, never counted; the policy's video_index numbers the
    video tokens themselves."""
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    start, end = prompt.span
    mask = holes(prompt.span)
    policy = KeepEvenVideo(3)
    out = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, policy, use_cache=True,
                          video_mask=mask)
    video = torch.arange(start, end)[mask]
    assert torch.equal(policy.seen["origin"][policy.seen["video"]], video)
    assert torch.equal(policy.seen["index"], torch.arange(len(video)))
    kept = torch.cat([torch.arange(start), torch.arange(start, end)[~mask], video[::2],
                      torch.arange(end, prompt.embeds.shape[1])]).sort().values
    assert torch.equal(out.kept, kept)
    assert out.layer_video_tokens == [len(video)] * 3 + [len(video[::2])] * (LAYERS - 3)
    assert out.state.is_video.sum() == len(video)
    # reference: the stock forward up to layer 3, the same rows kept, the stock forward after it
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=prompt.embeds, output_hidden_states=True).hidden_states[3]
    expected = stock_logits(adapter, h[:, kept], kept[None], causal(len(kept)), slice(3, None))
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, prompt.embeds.shape[1], depth=LAYERS))


def test_deepstack_levels_are_added_after_their_layers_to_the_video_tokens_present(adapter, pixels):
    """Level l goes to the video tokens (not the text among them) after layer l; a policy that drops
    tokens before a level leaves the kept ones theirs. Reference: the stock forward in pieces, each
    level added by hand."""
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    start, end = prompt.span
    mask = holes(prompt.span)
    video = torch.arange(start, end)[mask]
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(len(video), prompt.embeds.shape[-1], generator=g) for _ in range(2)]
    out = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, KeepEvenVideo(1),
                          use_cache=False, video_mask=mask, deepstack=levels)
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h1 = lm(inputs_embeds=prompt.embeds, output_hidden_states=True).hidden_states[1].clone()
        h1[0, video] += levels[0]  # after layer 0, every video token
        kept = torch.cat([torch.arange(start), torch.arange(start, end)[~mask], video[::2],
                          torch.arange(end, prompt.embeds.shape[1])]).sort().values
        with sliced(lm, slice(1, None)):
            h2 = lm(inputs_embeds=h1[:, kept], position_ids=kept[None], attention_mask=causal(len(kept)),
                    use_cache=False, output_hidden_states=True).hidden_states[1].clone()
        h2[0, torch.isin(kept, video[::2])] += levels[1][::2]  # after layer 1, the kept ones' own
    expected = stock_logits(adapter, h2, kept[None], causal(len(kept)), slice(2, None))
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, prompt.embeds.shape[1], depth=LAYERS))
    # zero features change nothing: exact
    zero = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, KeepEvenVideo(1),
                           use_cache=False, video_mask=mask, deepstack=[torch.zeros_like(l) for l in levels])
    plain = decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, KeepEvenVideo(1),
                            use_cache=False, video_mask=mask)
    assert torch.equal(zero.logits, plain.logits)


@pytest.mark.parametrize("layer, refused", [(1, True), (2, False)])
def test_a_merge_before_the_last_deepstack_level_is_refused(adapter, pixels, layer, refused):
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, none, ids)
    n = prompt.span[1] - prompt.span[0]
    levels = [torch.zeros(n, prompt.embeds.shape[-1]) for _ in range(2)]

    def run(policy):
        return decoder.prefill(adapter.llm, prompt.embeds, prompt.positions, prompt.span, policy, use_cache=False,
                               deepstack=levels)

    if refused:
        with pytest.raises(ValueError, match=f"merges video tokens at layer {layer}, before the DeepStack"):
            run(MergePairs(layer))
    else:
        run(MergePairs(layer))

    class Unchanged(KeepEvenVideo):  # hidden states given back as they were: no merge
        def act(self, view):
            keep = super().act(view)
            return Keep(keep.video, view.hidden[0, view.video[keep.video]])

    run(Unchanged(layer))
