"""Attention weights of a few queries at one decoder layer, computed beside the model's kernel.

Methods that rank video tokens by attention (FastV, PyramidDrop, PruneVid, DyCoke, ...) need a
handful of attention rows at one layer. These functions recompute exactly those rows from the
layer's input (its q/k projections, rotary embedding, grouped KV heads expanded, softmax in
float32, mean over heads), so the model itself keeps its SDPA/flash kernel everywhere: the
model is never switched to eager attention.
"""

from __future__ import annotations

import torch


def _repeat_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    """(1, kv_heads, n, hd) -> (1, kv_heads*groups, n, hd), as grouped-query attention reads it."""
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def project(attn, x: torch.Tensor, which: str) -> torch.Tensor:
    """(1, n, D) normed input -> (1, heads, n, hd) queries or keys (with per-head norms if any)."""
    proj, norm = (attn.q_proj, "q_norm") if which == "q" else (attn.k_proj, "k_norm")
    out = proj(x).view(1, x.shape[1], -1, attn.head_dim)
    if getattr(attn, norm, None) is not None:  # models with per-head q/k norms (Qwen3)
        out = getattr(attn, norm)(out)
    return out.transpose(1, 2)


def query_attention(layer, hidden: torch.Tensor, position_embeddings, queries: torch.Tensor,
                    apply_rotary) -> torch.Tensor:
    """(q, n) float32: attention of the sequence entries `queries` over all n entries at `layer`.

    hidden (1, n, D) is the layer's input and position_embeddings its rotary tables; entries are in
    position order, so query i sees the keys j <= queries[i] (causal), as the layer's kernel does.
    Mean over attention heads.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = project(attn, x[:, queries], "q")
    k = project(attn, x, "k")
    cos, sin = position_embeddings
    q, _ = apply_rotary(q, q, cos[..., queries, :], sin[..., queries, :])
    _, k = apply_rotary(k, k, cos, sin)
    k = _repeat_kv(k, attn.num_key_value_groups)
    logits = (q @ k.transpose(2, 3)) * attn.scaling  # (1, heads, q, n)
    future = torch.arange(hidden.shape[1], device=hidden.device)[None, :] > queries[:, None]
    logits = logits.masked_fill(future, torch.finfo(logits.dtype).min)
    return logits.softmax(-1, dtype=torch.float32)[0].mean(0)


def step_attention(layer, hidden: torch.Tensor, position_embeddings, past_keys: torch.Tensor,
                   apply_rotary) -> torch.Tensor:
    """(kv + 1,) float32: a decode step's attention over its layer's cached keys and itself.

    hidden (1, 1, D) is the layer's input for the new token, past_keys (1, kv_heads, kv, hd) the
    layer's cache (already rotated). Mean over attention heads.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q, k = project(attn, x, "q"), project(attn, x, "k")
    cos, sin = position_embeddings
    q, k = apply_rotary(q, k, cos, sin)
    keys = _repeat_kv(torch.cat([past_keys, k], dim=2), attn.num_key_value_groups)
    logits = (q @ keys.transpose(2, 3)) * attn.scaling  # (1, heads, 1, kv + 1)
    return logits.softmax(-1, dtype=torch.float32)[0, :, 0].mean(0)
