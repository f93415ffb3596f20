"""CDPruner: keep the tokens that maximise a conditional DPP: diverse among themselves, weighted by the question.

The kernel L = diag(rel) S diag(rel) combines the tokens' cosine similarities S with a relevance rel to
the question's tokens; the greedy fast-MAP inference of the DPP picks k = round(r*196) tokens per frame,
which are kept in original order.

Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs", NeurIPS 2025, arXiv:2506.10967. Official code followed: Theia-4869/CDPruner, read at commit
9541616, `llava/model/llava_arch.py` (`LlavaMetaForCausalLM.encode_images`, the [CDPruner] blocks),
`llava/model/multimodal_encoder/clip_encoder.py` (`CLIPVisionTower.load_text_tower`, `forward`: CLIP
image and text embeddings) and `llava/eval/model_vqa_loader.py` (the `texts`); it runs on LLaVA-1.5/1.6
with CLIP only.

As `encode_images` does, on the features x (n, D), image embeddings g (n, C) and text embeddings t (M, C):
1. S_ij = cos(x_i, x_j).
2. rel_i = mean_m(-cos(g_i, t_m)) (the minus sign is in the code, not in the paper; knob
   `relevance_sign`), then rel <- (rel - min + 1e-6) / (max - min), min and max over every token of
   the batch (all frames). Optional (commented out officially; knob `theta`, default off):
   rel <- exp(theta / (2(1 - theta)) * rel).
3. L_ij = rel_i S_ij rel_j.
4. Greedy fast MAP: d_i = L_ii; for t = 1..k: j = argmax d (ties: the lower index, as torch.argmax);
   e = (L_j. - sum_{s<t} c_s[j] c_s) / sqrt(d_j); c_t = e; d <- d - e^2; d_j = -inf.
5. The k picks, sorted: the kept tokens in original order.

Inputs in this harness (choice of this harness: LLaVA-OneVision and Qwen2.5-VL have no CLIP text tower;
the author says, Theia-4869/CDPruner issue #7, that on Qwen2.5-VL both image_features and image_embeds
are the merger outputs, and does not publish the text side): x = g = the pooled projector outputs X, and
t = the LLM's input embeddings of the question's tokens (`VisualInput.question`, M = its token count),
as openvinotoolkit/openvino_contrib's `genai_opt/visual_token_pruning.py` does (keeping the minus sign).
The question is the task's whole question text as the harness gives it (official: the raw question with
the answer-format suffix removed, cut into 77-token CLIP segments, one embedding per segment).

Video and positions:
- scope=frame (default; choice of this harness): the official code prunes each image of a batch with
  its own `visual_token_num`, so each frame keeps k = round(r*N) with the video-wide min/max of step 2.
- scope=video: one DPP over all F*N tokens, k = round(r*F*N).
- LLaVA-OneVision: the kept tokens take consecutive positions (a plain (M, D) tensor; the official code
  splices them in and renumbers). Qwen2.5-VL (choice of this harness, as for every visual stage
  there): they keep their original M-RoPE ids (`VideoTokens`). Knob `positions` (choice of this
  harness: compact | original) overrides this; null, the default, follows it (`methods.evs.placed`).

Deviations and choices:
- exhausted kernel (choice of this harness; the official code has no epsilon): a token is a DPP
  candidate only while d_j > 1e-4 * L_jj, i.e. while its feature direction is more than ~0.6 degrees
  away from the span of the picks (d_j / L_jj is that squared sine; rel cancels). Below it the official
  update divides by sqrt(~0) (noise, then NaN) once k exceeds the kernel's rank (exact duplicates,
  more picks than feature dimensions in scope=video) or reaches a zero token. When no candidate is
  left the remaining picks go by descending rel (ties: the lower index), and c and d are not updated.
- max == min relevance (choice of this harness; every token equally relevant, e.g. one token): rel = 1
  (official: 1e-6/0 = inf).
- S_ii = 1 exactly (choice of this harness; official: the float32 product's diagonal, 1 +- ulp), so
  tokens of equal relevance tie exactly on L_ii and the first pick goes to the lower index, not to
  round-off (e.g. with theta = 0 or equal relevance, where every L_ii is 1).
- zero tokens (choice of this harness) have cosine 0 to everything, themselves included (official:
  0/0 = NaN), so L_jj = 0 and they are picked last; zero question-token embeddings have cosine 0 too.
- decisions in float32 (float64 for float64 input); official: S in float32, rel in the model dtype.
- k >= 1 (`methods.core.select.kept_count`).
- retention = 1 keeps every token in original order: the same logits as `none`.

Cost: the (F, N, N) (scope video: (F*N)^2) product of X is the floor; the kernel is that product
scaled in place by rel_i / |x_i| (no normalised copy of X). Each greedy step is one batched
(1 x t)(t x n) product with the earlier c's: O(k^2 n) in all, as in the official code, with the frames
as one batch and no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import (Compressor, RetentionKnob, VideoTokens, VisualInput, fraction, knob, placed,
                               positions_knob)
from methods.core.select import kept_count
from methods.core.similarity import checked_features, compute_dtype, unit_rows

__all__ = ["EXHAUSTED", "SCOPES", "cdpruner_compress", "cdpruner_relevance", "cdpruner_select"]

SCOPES = ("frame", "video")
EXHAUSTED = 1e-4  # a token stays a DPP candidate while d_j > EXHAUSTED * L_jj


def cdpruner_relevance(features: torch.Tensor, question: torch.Tensor, sign: int = -1,
                       theta: float | None = None) -> torch.Tensor:
    """(..., D) tokens and (M, D) question-token embeddings -> (...) relevance, min-max normalised over
    all tokens (then exp(theta/(2(1-theta)) * rel) when theta is given), in the compute dtype."""
    dtype = compute_dtype(features.dtype)
    x = features.to(dtype)
    q = unit_rows(question.to(features.device, dtype))
    norms = torch.linalg.vector_norm(x, dim=-1)
    inverse = torch.where(norms > 0, norms.reciprocal(), 0.0)
    rel = (x @ q.mT).mean(dim=-1) * inverse * sign  # mean over the question's tokens of cos(x, q_m)
    low, high = rel.min(), rel.max()
    rel = torch.where(high > low, (rel - low + 1e-6) / (high - low), torch.ones_like(rel))
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel


@torch.no_grad()
def cdpruner_select(features: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n, D) tokens and (B, n) relevance -> (B, k) picks of each batch row, in pick order."""
    batch, n, _ = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"cdpruner: k={k}: expected 1 <= k <= n={n}")
    if relevance.shape != (batch, n):
        raise ValueError(f"cdpruner: relevance {tuple(relevance.shape)} does not match features "
                         f"{tuple(features.shape)}: expected ({batch}, {n})")
    dtype = compute_dtype(features.dtype)
    rel = relevance.to(features.device, dtype)
    x = features.to(dtype)
    norms = torch.linalg.vector_norm(x, dim=-1)
    weight = torch.where(norms > 0, rel / norms, 0.0)  # rel_i / |x_i|
    # L_ij = rel_i cos(x_i, x_j) rel_j from one product of X, scaled in place
    kernel = torch.bmm(x, x.mT).mul_(weight[:, :, None]).mul_(weight[:, None, :])
    # S_ii exactly 1 (0 for a zero token): the product's 1 +- ulp would break ties between equal L_ii
    kernel.diagonal(dim1=1, dim2=2).copy_(torch.where(norms > 0, rel * rel, 0.0))
    rows = kernel.view(batch * n, n)
    offsets = torch.arange(batch, device=kernel.device)[:, None] * n
    gain = kernel.diagonal(dim1=1, dim2=2).clone()  # d = L_jj
    floor = gain * EXHAUSTED
    cis = torch.zeros(batch, k, n, dtype=dtype, device=kernel.device)
    picks, live = [], []
    for t in range(k):
        # candidates: unpicked (d = -inf) tokens whose gain is above their threshold; the first maximum
        best, j = gain.masked_fill(gain <= floor, float("-inf")).max(dim=1, keepdim=True)
        alive = best > float("-inf")  # (B, 1); once False it stays False (nothing changes any more)
        picks.append(j)
        live.append(alive)
        if t + 1 < k:
            row = rows.index_select(0, (j + offsets).flatten())  # L_j.
            if t:
                row -= torch.bmm(cis[:, :t].gather(2, j[:, None].expand(batch, t, 1)).mT, cis[:, :t]).squeeze(1)
            # 1/sqrt(d_j); 0 once no candidate is left: c and d stay as they are
            scale = torch.where(alive, best.clamp(min=torch.finfo(dtype).tiny).rsqrt(), 0.0)
            e = torch.mul(row, scale, out=cis[:, t])
            gain.addcmul_(e, e, value=-1.0)
        gain.scatter_(1, j, float("-inf"))
    picks, live = torch.cat(picks, dim=1), torch.cat(live, dim=1)
    # without candidates: the unpicked tokens by descending relevance (ties: the lower index)
    picked = torch.zeros(batch, n + 1, dtype=torch.bool, device=kernel.device)
    picked = picked.scatter_(1, torch.where(live, picks, n), True)[:, :n]  # column n: the steps without a pick
    order = torch.sort(torch.where(picked, float("-inf"), rel), dim=1, descending=True, stable=True).indices
    done = live.sum(dim=1, keepdim=True)
    fill = order.gather(1, (torch.arange(k, device=kernel.device) - done).clamp(min=0))
    return torch.where(live, picks, fill)


@torch.no_grad()
def cdpruner_compress(features: torch.Tensor, question: torch.Tensor, retention: float = 0.25,
                      scope: str = "frame", theta: float | None = None, relevance_sign: int = -1) -> VideoTokens:
    """(F, N, D) features and (M, D) question-token embeddings -> VideoTokens: the kept tokens in original
    order, with their indices into the flattened F*N input as positions.

    scope="frame": k = max(1, round(r*N)) per frame; scope="video": max(1, round(r*F*N)) over the video."""
    CDPruner.check_knobs(retention=retention, scope=scope, theta=theta, relevance_sign=relevance_sign)
    frames, per_frame, dim = checked_features(features).shape
    question = checked_features(question, "question", "(M, D)")
    if question.shape[1] != dim:
        raise ValueError(f"cdpruner: question embeddings {tuple(question.shape)} do not match the features' "
                         f"width {dim}: expected (M, {dim})")
    rel = cdpruner_relevance(features, question, relevance_sign, theta)  # (F, N), video-wide min/max
    flat = features.reshape(frames * per_frame, dim)
    if scope == "video":
        keep = cdpruner_select(flat[None], rel.reshape(1, -1), kept_count(retention, frames * per_frame))[0]
        keep = keep.sort().values
    else:
        keep = cdpruner_select(features, rel, kept_count(retention, per_frame)).sort(dim=1).values
        keep = (keep + torch.arange(frames, device=keep.device)[:, None] * per_frame).flatten()
    return VideoTokens(flat.index_select(0, keep), keep)


@register
@dataclass
class CDPruner(Compressor):
    """`+method=cdpruner retention=0.25 [method.scope=video method.theta=0.5]`: reads the question."""

    name = "cdpruner"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    needs = frozenset({"question"})
    retention: float = fraction(0.25, "share of video tokens kept (official visual_token_num / N)")
    scope: str = knob("frame", "one DPP per frame, or one over the whole video", kind="choice", choices=SCOPES)
    theta: float | None = knob(None, "relevance weight: rel <- exp(theta/(2(1-theta)) rel); null: off (official)",
                               low=0.0, high=1.0, high_open=True, optional=True)
    relevance_sign: int = knob(-1, "sign of the question relevance (-1: the official code's; 1: the paper's)",
                               kind="choice", choices=(-1, 1))
    positions: str | None = positions_knob()

    def compress(self, x: VisualInput) -> torch.Tensor | VideoTokens:
        if x.question is None:
            raise ValueError("cdpruner needs the question's token embeddings (VisualInput.question)")
        kept = cdpruner_compress(x.features, x.question, self.retention, self.scope, self.theta,
                                 self.relevance_sign)
        return placed(kept, x, self.positions)

