"""The shared LLM driver: prefill layer by layer and decode steps, with per-layer token sets.

Every prefill and decode step of the harness runs here, over the Hugging Face decoder layers
(which keep their own attention kernel, SDPA by default). Without policies it computes exactly
what the model's own forward computes. Methods that act inside the LLM plug in as:

- a PrefillPolicy, called before each layer it names (`layers`), and/or inside a layer between
  its attention and its MLP (`mid_layers`, for methods whose official code acts there), with a
  PrefillView of the sequence at that point; it may drop video tokens, or drop some and give the
  kept ones new hidden states (merging), by returning a `Keep`. Kept tokens keep their original
  position ids; from there on layers see (and cache) only the kept tokens, so the KV cache of
  every layer holds exactly what that layer's attention saw;
- a DecodePolicy, called at every generated token before the layer it names, with a DecodeView;
  it may return which of that layer's cached video entries the layers from there on attend to
  (masked, not truncated).

Two departures from the keep-positions rule, for methods whose official code makes them, each
asked for by the `Keep` a prefill policy returns (absent, nothing changes):
- `Keep.order`: the kept video entries take the video's places in the sequence in another order
  (SparseVLM puts its recycled cluster tokens after the kept tokens). A cluster token is a kept
  entry whose hidden state is replaced: it keeps that entry's prompt index (`origin`) and, unless
  compacted, its position id;
- `Keep.compact`: from that layer on the sequence takes the position ids 0..n-1 (1-D position ids
  only; STTM's and SparseVLM's official LLaVA code). Prompt tokens a shared prefix is continued
  with (`extend`) then sit after each layer's compacted sequence, as they would in one prefill of
  the whole prompt (`DecoderState.position_shift`); decode steps continue after the unmerged
  prompt's last position in every layer (Hugging Face `generate`: STTM), or, when the policy sets
  `decode_positions = "cache"`, after each layer's own compacted numbering (the position is that
  layer's cache length: SparseVLM's official decoding).
A policy may also read the keys of a layer after its rotary embedding (`PrefillView.keys`) and the
sequence through the LLM's final norm (`PrefillView.final_norm`: DART), and the (h, w) token grid
of a frame (`PrefillView.grid`, when the caller gives it).

Two things a family may hand the prefill besides the span (absent, nothing changes):
- `video_mask`: which entries of the span [start, end) are video tokens; the others are text kept in
  place (Qwen3-VL's timestamps and frame markers between frames): never counted, offered to a policy
  or pruned as video tokens. The span starts and ends with a video token;
- `deepstack`: per level l, (V, D) features of the V video tokens (in prompt order) that are added to
  the hidden states of the video tokens still present after decoder layer l (Qwen3-VL's DeepStack,
  `Qwen3VLTextModel._deepstack_process`): a policy that dropped tokens before leaves the kept ones
  theirs. A policy cannot merge video tokens (give kept ones new hidden states) before the last such
  layer: a merged token has no features of its own to carry (ValueError).

Attention rows a policy needs come from `methods.core.attention` for the one layer asked, never from
eager attention. Policies report nothing into harness objects: `Prefill.layer_video_tokens` (video
tokens each layer's attention saw, which its KV cache holds), `Prefill.layer_mlp_video_tokens` (those
its MLP saw: fewer only where a policy dropped tokens mid-layer) and
`DecoderState.decode_video_visible` carry the counts back.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from methods.core.attention import project, query_attention, step_attention
from methods.core.flops import LLMShape


@dataclass
class LLM:
    """The narrow handle on a decoder-only LLM that the driver needs, given by the model adapter."""

    embed: torch.nn.Module  # token ids -> embeddings
    layers: torch.nn.ModuleList  # decoder layers, called as the model's own forward calls them
    rotary: torch.nn.Module  # (hidden, position_ids) -> (cos, sin)
    norm: torch.nn.Module  # final norm
    head: torch.nn.Module  # hidden -> logits
    config: object  # the text config (attention implementation, layer types)
    apply_rotary: Callable  # (q, k, cos, sin) -> (q, k), the model's rotary embedding

    @property
    def shape(self) -> LLMShape:
        return LLMShape.of(self.config)


# ---- what policies see and return ----------------------------------------------------------------
@dataclass
class Keep:
    """A prefill policy's decision: keep view.video[video] (ascending); drop the other video tokens.

    hidden, if given, replaces the kept tokens' hidden states (a merge of dropped tokens into them).
    """

    video: torch.Tensor  # (k,) long: indices into PrefillView.video
    hidden: torch.Tensor | None = None  # (k, D)
    # (k,) a permutation of 0..k-1: the kept video entries fill the video's places in the sequence
    # in the order video[order] (default: ascending, as they were)
    order: torch.Tensor | None = None
    compact: bool = False  # from this layer on the sequence takes position ids 0..n-1 (1-D ids only)


@dataclass
class PrefillView:
    """The sequence entering decoder layer `layer` (or, with `mid`, between its attention and its
    MLP), as a prefill policy sees it."""

    layer: int
    hidden: torch.Tensor  # (1, n, D): the input of `layer` (mid: the residual stream after attention)
    positions: torch.Tensor  # (..., n) position ids of the entries
    origin: torch.Tensor  # (n,) index of each entry in the prompt the prefill started with
    video: torch.Tensor  # (v,) indices into the sequence of its video tokens, ascending
    video_start: int  # prompt index of the first video token: origin[video] - video_start is the
    # index of each video token in the LLM's video input (without a video mask; with one, text sits
    # between video tokens: `video_index` holds their indices)
    query: torch.Tensor  # (q,) indices into the sequence of the text tokens after the video
    mid: bool = False  # between `layer`'s attention and its MLP
    groups: torch.Tensor | None = None  # (v,) group id of each video token, if the visual stage gave them
    video_index: torch.Tensor | None = None  # (v,) index of each video token in the F*N visual input
    # (its original index when the visual stage kept positions, else its index in the LLM's video input)
    frame_tokens: int | None = None  # N: tokens per frame of the visual input (video_index // N = frame)
    _inputs: dict = field(default_factory=dict, repr=False)  # layer -> (module, its input, rotary)
    _apply_rotary: Callable | None = field(default=None, repr=False)
    grid: tuple[int, int] | None = None  # (h, w) token grid of a frame (h*w = frame_tokens), if given
    _norm: Callable | None = field(default=None, repr=False)  # the LLM's final norm

    def attention(self, queries: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
        """(q, n) attention of `queries` (sequence indices; default the last entry) over the
        sequence at `layer`, recomputed from that layer's input. Default layer: the one whose
        attention ran last (layer - 1 before a layer, `layer` itself mid-layer); `layer` itself
        before it runs is allowed too. Mean over heads, float32."""
        module, hidden, rotary = self.layer_input(layer)
        if queries is None:
            queries = torch.tensor([hidden.shape[1] - 1], device=hidden.device)
        return query_attention(module, hidden, rotary, queries, self._apply_rotary)

    def layer_input(self, layer: int | None = None) -> tuple:
        """(decoder layer module, its input (1, n, D), its rotary tables) for `layer` (default as
        in `attention`), for methods whose official scoring differs from `attention`'s."""
        layer = (self.layer if self.mid else self.layer - 1) if layer is None else layer
        if layer not in self._inputs:
            raise ValueError(f"attention at layer {layer} from a policy at layer {self.layer}: "
                             f"available are layers {sorted(self._inputs)}")
        return self._inputs[layer]

    def keys(self, layer: int | None = None) -> torch.Tensor:
        """(n, kv_heads * head_dim) keys of `layer` (default as in `attention`) over the sequence,
        after its rotary embedding, key-value heads concatenated (not repeated for grouped queries):
        what that layer's attention caches."""
        module, hidden, (cos, sin) = self.layer_input(layer)
        k = project(module.self_attn, module.input_layernorm(hidden), "k")
        _, k = self._apply_rotary(k, k, cos, sin)
        return k[0].transpose(0, 1).reshape(k.shape[2], -1)

    def final_norm(self) -> torch.Tensor:
        """(1, n, D) the sequence's hidden states through the LLM's final norm (the norm the LM
        head reads)."""
        if self._norm is None:
            raise ValueError("this PrefillView was built without the LLM's final norm")
        return self._norm(self.hidden)


@dataclass
class DecodeView:
    """One decode step entering layer `layer`, as a decode policy sees it."""

    layer: int
    step: int  # 0 for the first generated token fed back
    hidden: torch.Tensor  # (1, 1, D): the layer's input for the new token
    video: torch.Tensor  # (v,) indices of the video entries in this layer's KV cache
    _inputs: dict = field(default_factory=dict, repr=False)  # layer -> (module, input, past keys)
    _rotary: tuple | None = field(default=None, repr=False)
    _apply_rotary: Callable | None = field(default=None, repr=False)

    def attention(self, layer: int | None = None) -> torch.Tensor:
        """(kv + 1,) this step's attention over a layer's cache entries and itself, mean over heads:
        at `layer` (default this view's layer) or the layer before it. The entries are those of
        that layer's cache; for the layer before, they are the same as this layer's unless a
        prefill policy acted in between."""
        layer = self.layer if layer is None else layer
        if layer not in self._inputs:
            raise ValueError(f"decode attention at layer {layer} from a policy at layer {self.layer}: "
                             f"available are layers {sorted(self._inputs)}")
        module, hidden, keys = self._inputs[layer]
        return step_attention(module, hidden, self._rotary, keys, self._apply_rotary)


class PrefillPolicy(Protocol):
    layers: tuple[int, ...]  # act before each of these decoder layers
    # (optional) mid_layers: tuple[int, ...]: act between these layers' attention and MLP
    # (optional) decode_positions: "prompt" (default) | "cache": where decode steps sit in a layer
    # whose sequence a `Keep.compact` renumbered (module docstring)

    def act(self, view: PrefillView) -> Keep | None: ...

    def planned(self, video_tokens: int, groups: torch.Tensor | None = None) -> list[int] | None:
        """Video tokens each layer's attention will process when `video_tokens` enter the LLM
        (with these group ids, if the visual stage gives them), if known without running the LLM
        (FLOPs matching); None when it depends on the data. A policy acting before layers only: its
        MLPs see the same counts (one acting mid-layer returns None)."""
        ...


class DecodePolicy(Protocol):
    layer: int  # the selection applies to this layer and every later one

    def select(self, view: DecodeView) -> torch.Tensor | None:
        """(v,) bool over view.video: the entries attended from here on (None: all)."""
        ...


# ---- prefill ---------------------------------------------------------------------------------------
@dataclass
class DecoderState:
    """What decoding needs after a prefill: the cache and, per layer, what its entries are."""

    cache: object  # a transformers DynamicCache
    layer_origin: list[torch.Tensor]  # per layer: prompt/generation index of each cache entry
    is_video: torch.Tensor  # (T,) bool over prompt indices
    next_position: torch.Tensor  # position ids of the next token, shaped (..., 1)
    generated: int = 0
    decode_video_visible: list = field(default_factory=list)  # share attended per step (0-d tensors)
    # per layer, how far a compacting policy moved the end of the prompt back (None: no layer was
    # compacted): tokens `extend` adds sit at their position ids minus it, as in one prefill of the
    # whole prompt; decode steps too when `decode_compact` (else at the unmerged prompt's positions)
    position_shift: list[int] | None = None
    decode_compact: bool = False

    def mark(self) -> "StateMark":
        """What `rewind` returns to: this state as it is now (e.g. after a shared prefix)."""
        return StateMark(list(self.layer_origin), self.is_video, self.next_position, self.generated,
                         [len(origin) for origin in self.layer_origin])

    def rewind(self, mark: "StateMark") -> None:
        """Back to `mark`: the cache entries added since are cropped from every layer (the prefix's
        own entries are kept, not copied), the indexes restored, the decode record emptied."""
        added = len(self.layer_origin[0]) - mark.lengths[0]
        if added:
            self.cache.crop(-added)  # every layer grew by the same entries since the mark
        self.layer_origin, self.is_video = list(mark.layer_origin), mark.is_video
        self.next_position, self.generated = mark.next_position, mark.generated
        self.decode_video_visible = []


@dataclass(frozen=True)
class StateMark:
    layer_origin: list
    is_video: torch.Tensor
    next_position: torch.Tensor
    generated: int
    lengths: list[int]


@dataclass
class Prefill:
    logits: torch.Tensor  # (1, n, vocab) for the last n entries (all, unless logits_to_keep)
    state: DecoderState | None  # None without a cache
    kept: torch.Tensor  # (n_last,) prompt indices of the entries the last layer processed, in
    # sequence order (ascending unless a policy reordered video entries, `Keep.order`)
    layer_video_tokens: list[int]  # video tokens each layer's attention processed (= its KV cache)
    layer_mlp_video_tokens: list[int]  # video tokens each layer's MLP processed (after a mid-layer act)


def _check(llm: LLM) -> None:
    if "sliding_attention" in (getattr(llm.config, "layer_types", None) or ()):
        raise ValueError("the decoder driver does not support sliding-window layers (the window "
                         "would count pruned positions)")


def _mask(llm: LLM, hidden, cache, layer: int, visible: torch.Tensor | None = None):
    """The layer's attention mask in the form its attention implementation wants (None for a
    plain causal mask under SDPA); `visible` (1, kv) hides cached entries from the query."""
    from transformers.masking_utils import create_causal_mask

    # position_ids are not passed: kept positions have gaps that it would read as packed sequences
    return create_causal_mask(config=llm.config, inputs_embeds=hidden, attention_mask=visible,
                              past_key_values=cache, position_ids=None, layer_idx=layer)


def _run(llm: LLM, layer: int, hidden, mask, rotary, cache):
    return llm.layers[layer](hidden, attention_mask=mask, position_embeddings=rotary,
                             past_key_values=cache, use_cache=cache is not None)


def _attend(llm: LLM, layer: int, hidden, mask, rotary, cache):
    """The first half of a decoder layer (norm, attention, residual), as its forward runs it."""
    module = llm.layers[layer]
    out, _ = module.self_attn(hidden_states=module.input_layernorm(hidden), attention_mask=mask,
                              position_embeddings=rotary, past_key_values=cache,
                              use_cache=cache is not None)
    return hidden + out


def _feed_forward(llm: LLM, layer: int, hidden):
    """The second half of a decoder layer (norm, MLP, residual)."""
    module = llm.layers[layer]
    return hidden + module.mlp(module.post_attention_layernorm(hidden))


def _timer(timer):
    return timer() if timer is not None else nullcontext()


@dataclass
class _Sequence:
    """The prefill's current sequence: states, positions, where each entry came from."""

    hidden: torch.Tensor
    positions: torch.Tensor
    origin: torch.Tensor
    rotary: tuple

    def apply(self, keep: Keep, is_video: torch.Tensor, llm: LLM) -> None:
        seq_video = is_video[self.origin].nonzero().flatten()
        hidden = self.hidden
        if keep.hidden is not None:
            hidden = hidden.clone()
            hidden[0, seq_video[keep.video]] = keep.hidden.to(hidden.dtype)
        mask = ~is_video[self.origin]
        mask[seq_video[keep.video]] = True
        kept = mask.nonzero().flatten()
        if keep.order is not None:  # the kept video entries change places among themselves
            slots = is_video[self.origin[kept]].nonzero().flatten()
            kept = kept.clone()
            kept[slots] = kept[slots][keep.order]
        self.hidden, self.positions, self.origin = hidden[:, kept], self.positions[..., kept], self.origin[kept]
        if keep.compact:
            if self.positions.dim() != 2:
                raise ValueError(f"compacted positions need 1-D position ids (1, n); these are "
                                 f"{tuple(self.positions.shape)} (M-RoPE keeps its original ids)")
            self.positions = torch.arange(len(kept), device=kept.device, dtype=self.positions.dtype)[None]
        self.rotary = llm.rotary(self.hidden, self.positions)


@torch.inference_mode()
def prefill(llm: LLM, embeds: torch.Tensor, positions: torch.Tensor, video: tuple[int, int],
            policy: PrefillPolicy | None = None, *, use_cache: bool = True, logits_to_keep: int = 0,
            timer: Callable | None = None, video_groups: torch.Tensor | None = None,
            video_index: torch.Tensor | None = None, frame_tokens: int | None = None,
            grid: tuple[int, int] | None = None, video_mask: torch.Tensor | None = None,
            deepstack: list[torch.Tensor] | None = None) -> Prefill:
    """Run the LLM over `embeds` (1, T, D) at `positions` (..., T): (1, T) sequence positions, or
    (3, 1, T) M-RoPE positions (Qwen2.5-VL); video tokens at [start, end) (those marked in
    `video_mask` (end - start,) bool, if given), with a group id each in `video_groups` and their
    index in the F*N visual input in `video_index`, and the (h, w) token grid of a frame in `grid`,
    for the policy; `deepstack`, features added to the video tokens after the first layers (module
    docstring).

    `timer()` (a context manager) times the policy's own work (compressor time).
    """
    _check(llm)
    depth, device = len(llm.layers), embeds.device
    before = set(policy.layers) if policy is not None else set()
    mid = set(getattr(policy, "mid_layers", ())) if policy is not None else set()
    bad = sorted(i for i in before | mid if not 0 <= i < depth)
    if bad:
        raise ValueError(f"a prefill policy acts at layer(s) {bad}: expected 0..{depth - 1}")
    start, end = video
    total = embeds.shape[1]
    is_video = torch.zeros(total, dtype=torch.bool, device=device)
    if video_mask is None:
        is_video[start:end] = True
    else:
        if video_mask.shape != (end - start,) or not (video_mask[0] and video_mask[-1]):
            raise ValueError(f"video_mask: expected (end - start,) = ({end - start},) bools, true at both ends "
                             f"of the span, got shape {tuple(video_mask.shape)}")
        is_video[start:end] = video_mask.to(device)
    # index of each prompt entry among the video tokens (valid at video entries)
    ordinal = None if video_mask is None and deepstack is None else is_video.cumsum(0) - 1
    if deepstack is not None and any(len(level) != int(is_video.sum()) for level in deepstack):
        raise ValueError(f"deepstack: expected (V, D) features per level for the {int(is_video.sum())} video "
                         f"tokens, got {[tuple(level.shape) for level in deepstack]}")
    cache = None
    if use_cache:
        from transformers import DynamicCache

        cache = DynamicCache(config=llm.config)
    seq = _Sequence(embeds, positions, torch.arange(total, device=device), llm.rotary(embeds, positions))
    inputs: dict = {}  # layer -> (module, input, rotary) for attention rows a policy asks for
    mask, stale = None, True  # one mask per run of layers that see the same sequence
    layer_origin, attention_counts, mlp_counts = [], [], []
    video_count = int(is_video.sum())  # video tokens in the sequence, recounted after each act
    end_position = positions.amax() + 1  # after the prompt's last position id
    shift, shifts = 0, []  # how far compaction moved the prompt's end back, per layer (0 or a 0-d tensor)

    def act(layer: int, at_mid: bool) -> None:
        nonlocal stale, video_count, shift
        video_entries = is_video[seq.origin].nonzero().flatten()
        present = seq.origin[video_entries] - start if video_mask is None else ordinal[seq.origin[video_entries]]
        groups = None if video_groups is None else video_groups[present]
        index = present if video_index is None else video_index[present]
        view = PrefillView(layer, seq.hidden, seq.positions, seq.origin, video_entries, start,
                           (seq.origin >= end).nonzero().flatten(), at_mid, groups, index, frame_tokens,
                           inputs, llm.apply_rotary, grid, llm.norm)
        with _timer(timer):
            keep = policy.act(view)
            if keep is not None and deepstack is not None and layer < len(deepstack):
                _check_no_merge(keep, seq.hidden[0, video_entries], layer, len(deepstack))
            if keep is not None:
                seq.apply(keep, is_video, llm)
                stale = True
                video_count = int(is_video[seq.origin].sum())
                if keep.compact:
                    shift = end_position - seq.positions.shape[-1]

    for i in range(depth):
        inputs = {k: v for k, v in inputs.items() if k == i - 1}  # only the layer before is kept
        if i in before:
            inputs[i] = (llm.layers[i], seq.hidden, seq.rotary)
            act(i, at_mid=False)
        if stale:
            mask, stale = _mask(llm, seq.hidden, cache, i), False
        inputs[i] = (llm.layers[i], seq.hidden, seq.rotary)
        layer_origin.append(seq.origin)
        attention_counts.append(video_count)
        shifts.append(shift)
        if i in mid:
            seq.hidden = _attend(llm, i, seq.hidden, mask, seq.rotary, cache)
            act(i, at_mid=True)
            seq.hidden = _feed_forward(llm, i, seq.hidden)
        else:
            seq.hidden = _run(llm, i, seq.hidden, mask, seq.rotary, cache)
        if deepstack is not None and i < len(deepstack):  # as _deepstack_process: after the layer
            entries = is_video[seq.origin].nonzero().flatten()
            hidden = seq.hidden.clone()
            hidden[0, entries] = hidden[0, entries] + deepstack[i][ordinal[seq.origin[entries]]].to(hidden.dtype)
            seq.hidden = hidden
        mlp_counts.append(video_count)
    hidden = seq.hidden[:, -logits_to_keep:] if logits_to_keep else seq.hidden
    logits = llm.head(llm.norm(hidden))
    state = None
    if cache is not None:
        # after the largest position id of the prompt (3-D rotary ids: the same for all axes)
        nxt = end_position.expand(*positions.shape[:-1], 1).clone()
        state = DecoderState(cache, layer_origin, is_video, nxt)
        if any(isinstance(s, torch.Tensor) for s in shifts):  # a policy compacted the positions
            state.position_shift = [int(s) for s in shifts]
            state.decode_compact = getattr(policy, "decode_positions", "prompt") == "cache"
    return Prefill(logits, state, seq.origin, attention_counts, mlp_counts)


def _check_no_merge(keep: Keep, video_hidden: torch.Tensor, layer: int, levels: int) -> None:
    """ValueError if `keep` gives kept video tokens new hidden states before the DeepStack features
    of layer `levels - 1` have been added (a merged token has none of its own)."""
    if keep.hidden is not None and not torch.equal(keep.hidden.to(video_hidden.dtype), video_hidden[keep.video]):
        raise ValueError(f"a prefill policy merges video tokens at layer {layer}, before the DeepStack features "
                         f"of layers 0-{levels - 1} are added, which a merged token cannot carry")


# ---- continuing a cached prompt ---------------------------------------------------------------------
def _rotaries(llm: LLM, hidden, positions, shift: list[int] | None) -> Callable[[int], tuple]:
    """Layer index -> rotary tables of `positions`, each layer's at positions - shift[layer] (one
    table per distinct shift); without shifts the same table for every layer."""
    if shift is None:
        rotary = llm.rotary(hidden, positions)
        return lambda i: rotary
    tables = {s: llm.rotary(hidden, positions - s) for s in set(shift)}
    return lambda i: tables[shift[i]]


@torch.inference_mode()
def extend(llm: LLM, state: DecoderState, embeds: torch.Tensor, positions: torch.Tensor,
           logits_to_keep: int = 0) -> torch.Tensor:
    """More prompt tokens (embeds (1, s, D) at `positions` (..., s)) through every layer on
    `state`'s cache: what one prefill of the whole prompt computes for them, in a second part (the
    shared-prefix engine continues a cached [head + video] prefix with each question). Each layer
    attends to its own cache, then the new tokens causally; no policy acts (a prefill policy that
    reads the question cannot share a prefix). In a layer whose prefix a policy compacted, the new
    tokens sit at their position ids minus that layer's `position_shift`. Returns their logits (the
    last `logits_to_keep`)."""
    _check(llm)
    hidden = embeds
    rotaries = _rotaries(llm, hidden, positions, state.position_shift)
    start, count = state.is_video.shape[0], embeds.shape[1]
    masks: dict = {}
    for i in range(len(llm.layers)):
        key = len(state.layer_origin[i])  # layers whose caches hold as many entries share a mask
        if key not in masks:
            masks[key] = _mask(llm, hidden, state.cache, i)
        hidden = _run(llm, i, hidden, masks[key], rotaries(i), state.cache)
    new = torch.arange(start, start + count, device=embeds.device)
    grown: dict = {}
    for i, origin in enumerate(state.layer_origin):
        if id(origin) not in grown:
            grown[id(origin)] = torch.cat([origin, new])
        state.layer_origin[i] = grown[id(origin)]
    state.is_video = torch.cat([state.is_video, state.is_video.new_zeros(count)])
    last = (positions.amax() + 1).expand(*positions.shape[:-1], 1)
    state.next_position = torch.maximum(state.next_position, last)
    hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    return llm.head(llm.norm(hidden))


# ---- decode ----------------------------------------------------------------------------------------
@torch.inference_mode()
def decode(llm: LLM, state: DecoderState, input_ids: torch.Tensor, policy: DecodePolicy | None = None,
           *, timer: Callable | None = None) -> torch.Tensor:
    """One generated token (input_ids (1, 1)) through every layer on `state`; (1, 1, vocab) logits.

    The token sits at the position after the prompt's last (original) position, whatever was
    pruned (with `decode_compact`, minus each layer's `position_shift`: after that layer's own
    compacted numbering); each layer attends to its own cache, minus the video entries a decode
    policy hides.
    """
    hidden = llm.embed(input_ids)
    positions = state.next_position
    rotaries = _rotaries(llm, hidden, positions, state.position_shift if state.decode_compact else None)
    prompt = state.is_video.shape[0]
    new_index = prompt + state.generated
    hidden_videos = None  # (T,) bool over prompt indices: video entries hidden from layers >= policy.layer
    masks: dict = {}
    inputs: dict = {}  # layer -> (module, its input, its cache keys before this step)
    for i in range(len(llm.layers)):
        origin = state.layer_origin[i]
        inputs = {k: v for k, v in inputs.items() if k == i - 1}
        inputs[i] = (llm.layers[i], hidden, state.cache.layers[i].keys)
        if policy is not None and i == policy.layer:
            slots = (origin < prompt).logical_and_(state.is_video[origin.clamp(max=prompt - 1)])
            video = slots.nonzero().flatten()
            view = DecodeView(i, state.generated, hidden, video, inputs, rotaries(i), llm.apply_rotary)
            with _timer(timer):
                chosen = policy.select(view)
            if chosen is not None:
                hidden_videos = torch.zeros(prompt, dtype=torch.bool, device=hidden.device)
                hidden_videos[origin[video[~chosen]]] = True
                # kept as a tensor: no host synchronisation per generated token
                state.decode_video_visible.append(chosen.double().mean() if len(chosen) else 1.0)
            else:
                state.decode_video_visible.append(1.0)
        key = (id(origin), hidden_videos is not None and i >= policy.layer)
        if key not in masks:
            visible = None
            if key[1]:
                from_prompt = origin < prompt
                hide = torch.zeros_like(from_prompt)
                hide[from_prompt] = hidden_videos[origin[from_prompt]]
                visible = torch.cat([~hide, hide.new_ones(1)])[None]
            masks[key] = _mask(llm, hidden, state.cache, i, visible)
        hidden = _run(llm, i, hidden, masks[key], rotaries(i), state.cache)
    # every layer cached the new token: extend each layer's index (layers of one stage share it)
    grown: dict = {}
    for i, origin in enumerate(state.layer_origin):
        if id(origin) not in grown:
            grown[id(origin)] = torch.cat([origin, origin.new_tensor([new_index])])
        state.layer_origin[i] = grown[id(origin)]
    state.generated += 1
    state.next_position = positions + 1
    return llm.head(llm.norm(hidden))
