"""FastV: prune video tokens inside the LLM, by the attention the last prompt token pays them.

Spec: shared/spec/methods.md ("FastV"); retention and FLOPs: shared/spec/measurement.md.

Layers 0..K-1 run on the full prompt. From the hidden state entering layer K-1 we compute one row
of attention weights (the last position over every position: its q/k projections, rotary embedding
at the original positions, grouped KV heads expanded, softmax, mean over heads), keep the
k = max(1, round(keep*F*N)) video tokens it attends to most plus every text token, and run layers
K..L-1 on that shorter sequence. Kept tokens keep their original position ids.

The decoder layers are driven by a thin loop that mirrors `Qwen2Model.forward` (transformers 5.x):
the model keeps its own attention kernel (SDPA by default) and only that one row is computed here.
The KV cache then holds every token for layers < K and only the kept ones for layers >= K; masks
are sized per stage from that stage's own cache layer, and a decode step is placed at the original
sequence length (see `FastV.decode`), so cache and positions agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods import register
from methods.base import Compressor, check_range


@dataclass
class FastVOutput:
    logits: torch.Tensor  # (1, n, vocab) for the positions left after pruning (the last n)
    past_key_values: object | None  # a transformers Cache, or None without use_cache
    kept: torch.Tensor | None = None  # original positions of the tokens layers >= K process


def _language_model(adapter):
    return adapter.model.model.language_model


def run_layers(lm, hidden, position_embeddings, position_ids, cache, layers: range):
    """Decoder layers `layers` of the Qwen2 model `lm` on `hidden` (1, n, D), as its forward does.

    The causal mask is built for the first layer of the range from that layer's cache (layers of a
    stage hold the same tokens; the two stages do not). position_ids are not given to the mask: the
    kept positions have gaps that it would read as packed sequences.
    """
    from transformers.masking_utils import create_causal_mask

    if not layers:
        return hidden
    mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=cache, position_ids=None, layer_idx=layers.start)
    for i in layers:
        hidden = lm.layers[i](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                              position_ids=position_ids, past_key_values=cache,
                              use_cache=cache is not None)
    return hidden


def last_token_attention(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(n,) float32 attention weights of the last position over all n positions at `layer`.

    `hidden` (1, n, D) is the layer's input; cos/sin (1, n, head_dim) its rotary tables. Computes
    what the layer's eager attention would give for that one query row (the last token sees every
    position, so no mask), averaged over the attention heads.
    """
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv, rotate_half

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    n, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x[:, -1:]).view(1, 1, -1, hd)
    k = attn.k_proj(x).view(1, n, -1, hd)
    if getattr(attn, "q_norm", None) is not None:  # models with per-head q/k norms (Qwen3)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, heads, 1, hd), (1, kv_heads, n, hd)
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos[:, :, -1:] + rotate_half(q) * sin[:, :, -1:]
    k = repeat_kv(k * cos + rotate_half(k) * sin, attn.num_key_value_groups)
    logits = (q @ k.transpose(2, 3)) * attn.scaling  # (1, heads, 1, n)
    return logits.softmax(-1, dtype=torch.float32)[0, :, 0].mean(0)


def select(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices (ascending) of the max(1, round(keep*n)) highest scores; ties go to lower indices."""
    k = max(1, round(keep * scores.shape[0]))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def keep_for_flops_ratio(target: float, K: int, layers: int, text_tokens: float, video_tokens: int,
                         hidden: int, ffn: int) -> float:
    """The keep whose prefill FLOPs ratio (harness.retention convention) equals `target`.

    rho_flops(v) = [K f(t+V) + (L-K) f(t+v)] / (L f(t+V)) with f(n) = (4d^2 + 2dm) n + 2d n^2 and
    v = keep*V video tokens in layers >= K; solved for v (the quadratic), keep = v / V. The
    smallest reachable ratio is v = 1 (FastV keeps at least one token); below it: ValueError.
    """
    if not 0 < target <= 1:
        raise ValueError(f"FLOPs ratio {target}: expected a value in (0, 1]")
    if not 1 <= K < layers:
        raise ValueError(f"fastv.K={K}: expected 1 <= K < {layers} (the LLM's layers)")
    a, b = 4 * hidden * hidden + 2 * hidden * ffn, 2 * hidden

    def f(n):
        return a * n + b * n * n

    full = f(text_tokens + video_tokens)

    def ratio(v):
        return (K * full + (layers - K) * f(text_tokens + v)) / (layers * full)

    lowest = ratio(1)
    if target < lowest:
        raise ValueError(
            f"a FLOPs ratio of {100 * target:g}% is unreachable with FastV K={K} on a {layers}-layer "
            f"LLM ({text_tokens:.0f} text + {video_tokens} video tokens): the smallest reachable is "
            f"{100 * lowest:.2f}% (K full layers, then 1 video token in each of the other {layers - K})")
    per_layer = (target * layers * full - K * full) / (layers - K)  # f(t + v) to reach
    n = (-a + math.sqrt(a * a + 4 * b * per_layer)) / (2 * b)
    return min(1.0, max(1.0, n - text_tokens) / video_tokens)


@register
@dataclass
class FastV(Compressor):
    name = "fastv"
    stage = "llm"
    retention_via = "keep"  # a requested retention sets keep, by matching prefill FLOPs
    label_knobs = ("K", "keep")
    K: int = 2
    keep: float = 0.5

    def __post_init__(self):
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise ValueError(f"fastv.K={self.K!r}: expected an integer >= 1 (the layers run unpruned)")
        check_range("fastv.keep", self.keep, 0.0, 1.0, low_open=True)

    def _check(self, lm):
        layers = lm.config.num_hidden_layers
        if self.K >= layers:
            raise ValueError(f"fastv.K={self.K}: expected K < {layers}, the LLM's number of layers")
        if getattr(lm, "has_sliding_layers", False):
            raise ValueError("fastv: LLMs with sliding-window layers are not supported (the window "
                             "would count pruned positions)")
        return layers

    def prefill(self, adapter, embeds, span, run, use_cache=True, logits_to_keep=0):
        """LLM prefill of `embeds` (1, T, D) whose video tokens are at span=(start, end)."""
        from transformers import DynamicCache

        lm = _language_model(adapter)
        layers, K = self._check(lm), self.K
        start, end = span
        total = embeds.shape[1]
        cache = DynamicCache(config=lm.config) if use_cache else None
        positions = torch.arange(total, device=embeds.device)[None]
        cos, sin = lm.rotary_emb(embeds, positions)

        hidden = run_layers(lm, embeds, (cos, sin), positions, cache, range(K - 1))
        with adapter.stopwatch("compressor", run.timings):
            scores = last_token_attention(lm.layers[K - 1], hidden, cos, sin)[start:end]
            chosen = select(scores, self.keep) + start
            kept = torch.cat([torch.arange(start, device=embeds.device), chosen,
                              torch.arange(end, total, device=embeds.device)])
        hidden = run_layers(lm, hidden, (cos, sin), positions, cache, range(K - 1, K))
        hidden, positions = hidden[:, kept], kept[None]
        hidden = run_layers(lm, hidden, (cos[:, kept], sin[:, kept]), positions, cache, range(K, layers))

        run.layer_video_tokens = [end - start] * K + [len(chosen)] * (layers - K)
        run.video_tokens_out = len(chosen)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = adapter.model.lm_head(lm.norm(hidden))
        return FastVOutput(logits=logits, past_key_values=cache, kept=kept)

    def decode(self, adapter, input_ids: torch.Tensor, cache):
        """Next-token step(s) on the cache of `prefill`: input_ids (1, n) -> logits (1, n, vocab).

        The new tokens sit at the ORIGINAL sequence length: layers < K cache every token, so layer
        0's cache length is it (layers >= K hold fewer keys; their length is not a position).
        """
        lm = _language_model(adapter)
        layers = self._check(lm)
        hidden = lm.embed_tokens(input_ids)
        start = cache.get_seq_length(0)
        positions = torch.arange(start, start + input_ids.shape[1], device=hidden.device)[None]
        pe = lm.rotary_emb(hidden, positions)
        hidden = run_layers(lm, hidden, pe, positions, cache, range(self.K))
        hidden = run_layers(lm, hidden, pe, positions, cache, range(self.K, layers))
        return FastVOutput(logits=adapter.model.lm_head(lm.norm(hidden)), past_key_values=cache)
