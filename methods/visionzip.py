"""VisionZip: per frame, keep the most-attended (dominant) tokens, merge the rest into a few contextual ones.

Each frame keeps k = max(1, round(r*196)) tokens: the k_d = round(k*54/64) tokens whose patches receive the
most vision-encoder attention, then k_c = k - k_d means of the remaining tokens around evenly spaced targets.

Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025, arXiv:2412.04467. Official code followed: the LLaVA-OneVision port in cokeshao/HoliTom,
read at commit e9b2972, `visionzip/llava_arch.py` (the nested `visionzip(...)` in
`LlavaMetaForCausalLM_visionzip.prepare_inputs_labels_for_multimodal`) with
`LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py` (WRAPPER=visionzip: attention and head-mean
keys of the last used SigLIP layer) and `scripts/eval_ov-7b_visionzip.sh` (SPATIAL_TOKENS); the original
is dvlab-research/VisionZip, read at commit 3151f6d, `visionzip/clip_encoder.py`
(`CLIPVisionTower_VisionZip.forward`) with `visionzip/utils.py` (`CLIPAttention_forward`,
`CLIP_EncoderLayer_forward`: the head-mean keys).

Per frame f, with x = X[f] (N, D), s = scores[f] (N,), m = keys[f] (N, C):
1. Dominant: the k_d highest s (ties: lower index), output in original order.
2. The other N - k_d tokens R, in original order; targets R[0], R[step], ... (the first k_c),
   step = floor((N - k_d) / k_c). Every other token of R joins the target whose key m has the highest
   cosine similarity with its own (ties: the first target); a target becomes the mean of itself and
   its members.
3. Output: dominant tokens, then contextual tokens in target order; frames in order, at consecutive
   positions (the official code renumbers positions the standard LLaVA way).

Scores and keys come from the harness (`patch_scores`, `patch_keys`): the attention each SigLIP patch
receives in the last encoder layer LLaVA-OneVision uses, mean over heads and queries, and that layer's
keys, mean over heads, both recomputed for that one layer; both are resized 27x27 -> 14x14 with the
features' bilinear pooling (`methods.topk.pooled_scores`), as the official port does (`get_2dPool`).

Deviations and choices, with reasons:
- Budget (choice of this harness): k = max(1, round(r*196)) per frame, k_d = round(k*54/64) with
  Python's round (half to even: k = 16 -> 14, k = 48 -> 40). The official port sets k by hand
  (SPATIAL_TOKENS = 20/30/40/50 for r = 0.10/0.15/0.20/0.25) and takes k_d = int(k*54/64) (k = 20:
  16 + 4 officially, 17 + 3 here).
- k_c = 0 (k <= 3 with this rounding): only the dominant tokens; the others are dropped.
- Merge (choice of this harness): a contextual token is the mean of its target and its members; the
  official code adds the members' mean to the target (target + mean(members)).
- Similarity (official followed): cosine of the pooled head-mean keys, not of the
  features. A zero key has cosine 0 to every target (the official code would divide by zero).
- Ties (choice of this harness): dominant ties go to the lower index (official `topk`: unspecified);
  similarity ties to the first target (as the official `argmax`).
- Precision: decisions (pooled scores, keys, cosines) in float32 (the official code uses the model
  dtype); means in float32 (float64 for float64 input); the output has the input's dtype.
- retention=1 keeps every token but reorders each frame (dominant first), so it does not reproduce
  the uncompressed model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from methods import register
from methods.core.base import Compressor, RetentionKnob, VisualInput, fraction
from methods.core.select import kept_count, top_k_ascending
from methods.core.similarity import compute_dtype, unit_rows
from methods.topk import pooled_scores

__all__ = ["token_split", "visionzip_compress"]

DOMINANT_SHARE = 54 / 64  # the official 54 dominant : 10 contextual split


def token_split(retention: float, n: int) -> tuple[int, int]:
    """(k_d, k_c): dominant and contextual tokens per frame of n tokens (this harness's rounding)."""
    k = kept_count(retention, n)
    dominant = round(k * DOMINANT_SHARE)
    return dominant, k - dominant


@torch.no_grad()
def visionzip_compress(features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor,
                       retention: float) -> torch.Tensor:
    """(F, N, D) tokens, (F, N) scores and (F, N, C) keys on the same grid -> (F*k, D) tokens."""
    VisionZip.check_knobs(retention=retention)
    frames, n, dim = features.shape
    if scores.shape != (frames, n) or keys.dim() != 3 or keys.shape[:2] != (frames, n):
        raise ValueError(f"visionzip: scores {tuple(scores.shape)} and keys {tuple(keys.shape)} do not "
                         f"match features {tuple(features.shape)}: expected ({frames}, {n}) and "
                         f"({frames}, {n}, C)")
    device = features.device
    n_dom, n_ctx = token_split(retention, n)
    dominant = top_k_ascending(scores.to(device, torch.float32), n_dom)  # (F, k_d) ascending
    if n_ctx == 0:
        return features.gather(1, dominant[..., None].expand(-1, -1, dim)).flatten(0, 1)

    # the remaining tokens, ascending: a stable sort puts the non-dominant ones first, in order
    is_dominant = torch.zeros(frames, n, dtype=torch.uint8, device=device).scatter_(1, dominant, 1)
    rest = torch.sort(is_dominant, dim=1, stable=True).indices[:, :n - n_dom]  # (F, R)
    step = (n - n_dom) // n_ctx  # >= 1: R = n - k_d >= k - k_d = k_c
    targets = torch.arange(0, step * n_ctx, step, device=device)  # positions in R

    # cosine of the keys; every token of R joins its most similar target, a target itself
    unit = unit_rows(keys.to(device, torch.float32).gather(1, rest[..., None].expand(-1, -1, keys.shape[2])))
    assign = torch.bmm(unit, unit[:, targets].mT).argmax(dim=2)  # (F, R): first maximum on ties
    assign[:, targets] = torch.arange(n_ctx, device=device)

    # output row of every token: dominant j of frame f -> f*k + j, a token of R -> its target's row;
    # each row is the mean of its tokens (one for a dominant token), one pass over X
    k = n_dom + n_ctx
    base = torch.arange(frames, device=device)[:, None] * k
    row = torch.empty(frames, n, dtype=torch.long, device=device)
    row.scatter_(1, dominant, base + torch.arange(n_dom, device=device))
    row.scatter_(1, rest, base + n_dom + assign)
    row = row.flatten()
    tokens = torch.sort(row, stable=True).indices  # grouped by output row
    sizes = torch.zeros(frames * k, dtype=torch.long, device=device).scatter_add_(0, row, torch.ones_like(row))
    compute = compute_dtype(features.dtype)
    out = nnf.embedding_bag(tokens, features.reshape(frames * n, dim).to(compute), sizes.cumsum(0) - sizes,
                            mode="mean")
    return out.to(features.dtype)


@register
@dataclass
class VisionZip(Compressor):
    """`+method=visionzip retention=r`: k = round(r*196) tokens per frame."""

    name = "visionzip"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    needs = frozenset({"patch_scores"})  # the scores come with the layer's keys (patch_keys)
    retention: float = fraction(0.25, "share of each frame's tokens kept (54:10 dominant:contextual)")

    def compress(self, x: VisualInput) -> torch.Tensor:
        if x.patch_scores is None or x.patch_keys is None:
            raise ValueError("visionzip needs the vision encoder's patch attention and keys "
                             "(patch_scores, patch_keys)")
        scores = pooled_scores(x.patch_scores, x.grid, x.patch_grid)  # (F, 196)
        keys = pooled_scores(x.patch_keys, x.grid, x.patch_grid)  # (F, 196, C), the same bilinear resize
        return visionzip_compress(x.features, scores, keys, self.retention)
