"""A deliberately literal restatement of DART (Wen et al., EMNLP 2025; official ZichenWen1/DART
5a19452 `DART.get_retained_image_token`, its Qwen2.5-VL budget; this harness's choices as documented
in methods/dart.py). For tests only; it never imports methods/dart.py.

- `reference_select`: Python sets and sorts over sequence indices, float64 norms and cosines: the
  image and text pivots by key L1 norm (ties: lower index), then for each pivot in ascending
  sequence index the t = int(keep*V / (p_i + p_t)) remaining video tokens of lowest cosine (ties:
  lower index) are kept and leave the candidates.
- `stock_inputs`: what DART reads, from the *stock* model: layer K-1's cached keys (after the rotary
  embedding) and its output through the final norm.
- `masked_logits`: the stock model over every token at its original position, layers >= K
  forbidden to attend to the dropped video tokens (the uncached reference of a prefill and of each
  decode step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RefSelect:
    kept: list[int]  # sequence indices of the kept video tokens, ascending
    margin: float  # smallest gap at any ranking cut (norm or cosine)


def _ranked(items, score):
    return sorted(items, key=lambda i: (-score[i], i))


def reference_select(keys: torch.Tensor, normed: torch.Tensor, video: range, text: list[int],
                     pivot_image: int, pivot_text: int, keep: float) -> RefSelect:
    keys, normed = keys.double(), normed.double()
    v = len(video)
    picks = int(keep * v / (pivot_image + pivot_text))
    norm = {i: float(keys[i].abs().sum()) for i in list(video) + list(text)}
    margin = math.inf
    ranked_video, ranked_text = _ranked(video, norm), _ranked(text, norm)
    if 0 < pivot_image < v:
        margin = min(margin, norm[ranked_video[pivot_image - 1]] - norm[ranked_video[pivot_image]])
    if 0 < pivot_text < len(text):
        margin = min(margin, norm[ranked_text[pivot_text - 1]] - norm[ranked_text[pivot_text]])
    image_pivots, text_pivots = ranked_video[:pivot_image], ranked_text[:pivot_text]
    kept = set(image_pivots)
    candidates = set(video) - kept
    for pivot in sorted(image_pivots) + sorted(text_pivots):
        a = normed[pivot]
        cos = {c: float(a @ normed[c] / (a.norm() * normed[c].norm())) for c in candidates}
        order = sorted(candidates, key=lambda c: (cos[c], c))
        if 0 < picks < len(order):
            margin = min(margin, cos[order[picks]] - cos[order[picks - 1]])
        take = order[:picks]
        kept |= set(take)
        candidates -= set(take)
    return RefSelect(sorted(kept), margin)


def stock_inputs(lm, embeds: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys (n, kv_heads*head_dim), normed (n, D)) of the stock model at layer K-1 = layer - 1."""
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, use_cache=True, output_hidden_states=True)
        keys = out.past_key_values.layers[layer - 1].keys[0]  # (kv_heads, n, hd), rotated
        return keys.transpose(0, 1).reshape(keys.shape[1], -1), lm.norm(out.hidden_states[layer])[0]


def masked_logits(lm, head, embeds: torch.Tensor, dropped: list[int], layer: int) -> torch.Tensor:
    """(n, vocab) logits of the stock model (any attention implementation): every token at its
    original position, layers >= `layer` hide `dropped` from every query (a dropped token's own row
    stays finite, unused)."""
    n = embeds.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[:, dropped] = False
    allowed |= torch.eye(n, dtype=torch.bool)
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    def hook(module, args, kwargs):
        if module.self_attn.layer_idx >= layer:
            kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in lm.layers]
    try:
        with torch.no_grad():
            hidden = lm(inputs_embeds=embeds, position_ids=torch.arange(n)[None], use_cache=False).last_hidden_state
            return head(hidden)[0]
    finally:
        for h in handles:
            h.remove()
