"""A deliberately literal restatement of PyramidDrop (Xing et al., CVPR 2025, arXiv:2410.17247; official
Cooperx521/PyramidDrop `pdrop_rank_drop`; this harness's choices as documented in methods/pdrop.py).

For tests only; it never imports methods/pdrop.py or methods/fastv.py:
- `reference_counts`: stage s keeps max(1, floor(V0·λ^s)) in exact rational arithmetic on the
  decimal λ (what the official literal ratio lists [1, 0.5, 0.25, 0.125] mean);
- `reference_prefill`: the whole prefill on the *stock* eager Qwen2 model, every token kept in the
  sequence at its original position. For each stage the stock model runs with the drops so far as
  attention masks (layers from K_j on do not see what stage j dropped); its eager attention
  weights at layer K_s (on the sequence entering K_s: stage s's own drop not applied yet) rank the
  video tokens by the last prompt token's row, mean over heads, and the stage keeps its count
  (ties: lower index). A last run with every mask gives the logits. Generated tokens may follow
  the prompt (`query` = the last prompt token): the uncached decode reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


def reference_layers(depth: int) -> list[int]:
    return [round(depth / 4), round(depth / 2), round(3 * depth / 4)]


def reference_counts(lambda_: float, video: int, stages: int = 3) -> list[int]:
    ratio = Fraction(repr(lambda_))
    return [max(1, math.floor(video * ratio ** s)) for s in range(1, stages + 1)]


@dataclass
class RefRun:
    logits: torch.Tensor  # (1, n, vocab): the stock forward over every token, all drops masked
    kept: list[list[int]]  # per stage: prompt indices of the video tokens it keeps, ascending
    counts: list[int]  # video tokens each layer processes
    margin: float  # smallest gap between the last kept and first dropped score of any stage


def _masked_run(lm, embeds, drops: list[tuple[int, set]], output_attentions: bool):
    """Stock forward; layer i hides from every row the tokens dropped by stages with K <= i."""
    n = embeds.shape[1]

    def mask_for(layer):
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        hidden = sorted(set().union(*[d for k, d in drops if k <= layer]))
        allowed[:, hidden] = False
        allowed |= torch.eye(n, dtype=torch.bool)  # a dropped token's own row (unused) stays finite
        return torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    def hook(module, args, kwargs):
        kwargs["attention_mask"] = mask_for(module.self_attn.layer_idx)
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lm.layers]
    try:
        with torch.no_grad():
            return lm(inputs_embeds=embeds, position_ids=torch.arange(n)[None], use_cache=False,
                      output_attentions=output_attentions)
    finally:
        for h in handles:
            h.remove()


def reference_prefill(lm, head, embeds: torch.Tensor, span: tuple[int, int], query: int,
                      layers: list[int], lambda_: float) -> RefRun:
    """`lm`: the stock Qwen2 model loaded with eager attention."""
    start, end = span
    depth = len(lm.layers)
    counts_per_stage = reference_counts(lambda_, end - start, len(layers))
    alive = list(range(start, end))
    drops, kept, margin = [], [], math.inf
    for layer, keep in zip(layers, counts_per_stage):
        out = _masked_run(lm, embeds, drops, output_attentions=True)
        row = out.attentions[layer][0, :, query].double().mean(0)  # mean over heads
        ranked = sorted(alive, key=lambda i: (-float(row[i]), i))
        if keep < len(ranked):
            margin = min(margin, float(row[ranked[keep - 1]] - row[ranked[keep]]))
        chosen = sorted(ranked[:keep])
        drops.append((layer, set(alive) - set(chosen)))
        alive = chosen
        kept.append(chosen)
    hidden = _masked_run(lm, embeds, drops, output_attentions=False).last_hidden_state
    counts, current = [], end - start
    for i in range(depth):
        if i in layers:
            current = counts_per_stage[layers.index(i)]
        counts.append(current)
    with torch.no_grad():
        logits = head(hidden)
    return RefRun(logits, kept, counts, margin)
