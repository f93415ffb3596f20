"""VisPruner: keep the most attended tokens, then thin the rest to a diverse set by repeated matching.

Per frame, k = round(r*196) tokens: k_imp = int(k*important_ratio) tokens whose patches receive the
most vision-encoder attention, then the remaining tokens are halved into alternating sets A and B and
the `step` A-tokens most similar to some B-token are dropped, round after round, until k - k_imp remain.

Paper: Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning
in VLMs", ICCV 2025, arXiv:2412.01818. Official code followed: Theia-4869/VisPruner, read at commit
aefa01a, `llava/model/llava_arch.py` (`LlavaMetaForCausalLM.encode_images`, the [VisPruner] blocks),
`llava/model/multimodal_encoder/clip_encoder.py` and `siglip_encoder.py` (`feature_select`: the visual
attention) and `llava/eval/model_vqa_loader.py` (`--important_ratio` 0.5); the official code runs on
LLaVA-1.5/1.6 images. ModelTC/LightCompress, read at commit 9701d03,
`llmc/compression/token_reduction/vispruner.py` (`VisPruner.register_reduction_modules`:
`get_index_masks_hook`, the same algorithm, and `prune_qwenv25vl_hook` + `merger_hook`, its Qwen2.5-VL
port) is followed where the official code has no answer.

On one image of N tokens x (N, D) with attention scores s (N,), as `encode_images` does:
1. k_imp = int(k*important_ratio), plus one when N - k_imp is odd and k_imp < k (LightCompress's
   Qwen2.5-VL rule, see below); k_div = k - k_imp.
2. Tokens by descending s (ties: the lower index); the first k_imp are kept (important), the rest
   form the residual list R, in that order.
3. While |R| > k_div: s' = min(step, |R| - k_div, |A|); A = R[0::2], B = R[1::2] (list positions);
   score(a) = max_b cos(a, b); the s' A-tokens with the highest score are dropped (ties: the earlier
   A-token counts as higher); R <- [the other A-tokens, by descending score] + [B, in order].
   k_div = 0 keeps only the important tokens.
4. Important + R, as a mask: the kept tokens in original order.

Inputs in this harness: x = the video's pooled projector outputs X (official: the pre-projector patch
features of the select layer; choice of this harness for LLaVA-OneVision, the features the LLM gets;
LightCompress's Qwen2.5-VL port uses the LLM-input video embeddings, i.e. X), s = `patch_scores` (the
attention each patch receives in the last encoder layer the model uses, mean over heads and queries)
pooled to the token grid like the features (`methods.topk.pooled_scores`): the official SigLIP path
(`attentions[-1]` mean over queries, then over heads); CLIP's [CLS] row has no SigLIP counterpart.
On Qwen2.5-VL the scores are the last vision block's, averaged over each merge unit's 4 patches, as
LightCompress's `merger_hook` (which sums over the queries instead of averaging: within one temporal
patch the same ranking) and as the author describes it for encoders without [CLS] and with a patch
merger (Theia-4869/VisPruner issue #1).

Video and positions:
- scope=frame (default; choice of this harness): each frame is an image of its own with k = round(r*N)
  (the official code prunes each image of a batch with its own `visual_token_num`).
- scope=video: one image of all F*N tokens, k = round(r*F*N): what LightCompress's Qwen2.5-VL hook does
  (it prunes all video tokens of the prompt at once).
- LLaVA-OneVision: the kept tokens take consecutive positions (a plain (M, D) tensor; the official
  code splices them in and renumbers). Qwen2.5-VL: they keep their original M-RoPE ids (`VideoTokens`),
  as LightCompress keeps `position_ids[:, :, mask]`. Knob `positions` (choice of this harness:
  compact | original) overrides this; null, the default, follows it (`methods.evs.placed`).

Deviations and choices:
- parity of R (choice of this harness, after LightCompress): `encode_images` indexes A with `R // 2` rows, so
  it raises a shape error whenever |R| is odd (e.g. LLaVA-OneVision, N = 196, k = 39: k_imp = 19,
  |R| = 177). LightCompress's Qwen2.5-VL port adds one important token when N - k_imp is odd; this
  harness applies that rule on every input (model-independent; on the official LLaVA-1.5 settings,
  576 tokens and even budgets, it changes nothing). It is skipped when k_imp = k (it would keep k + 1).
  A non-default odd `step` can still make |R| odd later: A = R[0::2] then has one token more than B.
- s' <= |A| (choice of this harness): the official `argsort(...)[:, r:]` with r > |A| (small k_div: |R| < 16 with
  |R| - k_div >= 8) fails on a negative `expand`; here at most all of A is dropped in a round.
- ties (choice of this harness): stable sorts, so equal scores go to the lower index / the earlier A-token (official
  `argsort`: unspecified order on ties).
- zero tokens have cosine 0 to everything (choice of this harness; official: 0/0 = NaN).
- k >= 1 (`methods.core.select.kept_count`; official `visual_token_num` is an integer >= 1).
- decisions in float32 (float64 for float64 input); official: the model dtype (fp16).
- retention = 1 keeps every token in original order: the same logits as `none`.

Cost: each round needs the cosines of its A x B pairs, and the rounds together touch ~90 % of the
pairs of R (LLaVA-OneVision sizes, benchmarks/bench_vispruner.py), so the (N, N) Gram matrix of each
frame is computed once (one batched product of X, scaled by the inverse norms: cheaper than gathering
the residual rows first) and every round gathers its A x B block from it; the frames are one batch,
and the number of rounds is known on the host (no device synchronisation). scope=video works on one
(F*N)^2 matrix: its rounds' gathers (~|R0|^3/96 entries) dominate on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import (Compressor, RetentionKnob, VideoTokens, VisualInput, fraction, knob, placed,
                               positions_knob, share)
from methods.core.select import kept_count, top_k
from methods.core.similarity import checked_features, compute_dtype
from methods.topk import pooled_scores

__all__ = ["SCOPES", "vispruner_compress", "vispruner_select", "vispruner_split"]

SCOPES = ("frame", "video")


def vispruner_split(k: int, n: int, important_ratio: float) -> tuple[int, int]:
    """(k_imp, k_div) of k kept tokens out of n: int(k*ratio), plus one when n - k_imp is odd and k_imp < k."""
    important = int(k * important_ratio)
    if important < k and (n - important) % 2:
        important += 1
    return important, k - important


@torch.no_grad()
def vispruner_select(features: torch.Tensor, scores: torch.Tensor, k: int, important_ratio: float = 0.5,
                     step: int = 8) -> torch.Tensor:
    """(B, n, D) tokens and (B, n) scores -> (B, k) kept indices of each batch row, ascending."""
    batch, n, dim = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"vispruner: k={k}: expected 1 <= k <= n={n}")
    if scores.shape != (batch, n):
        raise ValueError(f"vispruner: scores {tuple(scores.shape)} do not match features {tuple(features.shape)}: "
                         f"expected ({batch}, {n})")
    device, dtype = features.device, compute_dtype(features.dtype)
    n_imp, n_div = vispruner_split(k, n, important_ratio)
    order = top_k(scores.to(device, dtype), n)  # descending, ties to the lower index
    important, residual = order[:, :n_imp], order[:, n_imp:]
    if n_div == 0:
        return important.sort(dim=1).values
    if n_div < residual.shape[1]:
        # every pair's cosine, once: (x_i . x_j) / (|x_i| |x_j|), 0 for a zero token
        x = features.to(dtype)
        norms = torch.linalg.vector_norm(x, dim=-1)
        inverse = torch.where(norms > 0, norms.reciprocal(), 0.0)
        gram = torch.bmm(x, x.mT).mul_(inverse[:, :, None]).mul_(inverse[:, None, :]).view(batch, n * n)
        pos = residual  # R, as token indices
        # the rounds' A x B blocks shrink: buffers of the first one's size serve them all (no page faults)
        size = batch * ((pos.shape[1] + 1) // 2) * (pos.shape[1] // 2)
        pair_buffer = torch.empty(size, dtype=torch.long, device=device)
        cos_buffer = torch.empty(size, dtype=dtype, device=device)
        while pos.shape[1] > n_div:
            a, b = pos[:, 0::2], pos[:, 1::2]
            drop = min(step, pos.shape[1] - n_div, a.shape[1])
            block = batch * a.shape[1] * b.shape[1]
            pairs = torch.add(a[:, :, None] * n, b[:, None, :], out=pair_buffer[:block].view(batch, a.shape[1], -1))
            cos = torch.gather(gram, 1, pairs.view(batch, -1), out=cos_buffer[:block].view(batch, -1))
            best = cos.view(batch, a.shape[1], b.shape[1]).amax(dim=2)  # (B, |A|): max over B of cos(a, b)
            rank = torch.sort(best, dim=1, descending=True, stable=True).indices
            pos = torch.cat([a.gather(1, rank[:, drop:]), b], dim=1)
        residual = pos
    return torch.cat([important, residual], dim=1).sort(dim=1).values


@torch.no_grad()
def vispruner_compress(features: torch.Tensor, scores: torch.Tensor, retention: float = 0.25,
                       important_ratio: float = 0.5, step: int = 8, scope: str = "frame") -> VideoTokens:
    """(F, N, D) features and (F, N) scores on the same grid -> VideoTokens: the kept tokens in original
    order, with their indices into the flattened F*N input as positions.

    scope="frame": k = max(1, round(r*N)) per frame; scope="video": max(1, round(r*F*N)) over the video."""
    VisPruner.check_knobs(retention=retention, important_ratio=important_ratio, step=step, scope=scope)
    frames, per_frame, dim = checked_features(features).shape
    if scores.shape != (frames, per_frame):
        raise ValueError(f"vispruner: scores {tuple(scores.shape)} do not match features "
                         f"{tuple(features.shape)}: expected ({frames}, {per_frame})")
    flat = features.reshape(frames * per_frame, dim)
    if scope == "video":
        keep = vispruner_select(flat[None], scores.reshape(1, -1), kept_count(retention, frames * per_frame),
                                important_ratio, step)[0]
    else:
        keep = vispruner_select(features, scores, kept_count(retention, per_frame), important_ratio, step)
        keep = (keep + torch.arange(frames, device=keep.device)[:, None] * per_frame).flatten()
    return VideoTokens(flat.index_select(0, keep), keep)


@register
@dataclass
class VisPruner(Compressor):
    """`+method=vispruner retention=0.25 [method.important_ratio=0.5 method.scope=video]`."""

    name = "vispruner"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    needs = frozenset({"patch_scores"})
    retention: float = fraction(0.25, "share of video tokens kept (official visual_token_num / N)")
    important_ratio: float = share(0.5, "share of the kept tokens chosen by attention (the rest: diverse)")
    step: int = knob(8, "tokens removed per matching round", kind="integer", low=1)
    scope: str = knob("frame", "prune each frame as an image, or the whole video as one", kind="choice",
                      choices=SCOPES)
    positions: str | None = positions_knob()

    def compress(self, x: VisualInput) -> torch.Tensor | VideoTokens:
        if x.patch_scores is None:
            raise ValueError("vispruner needs the vision encoder's patch attention (patch_scores)")
        scores = pooled_scores(x.patch_scores, x.grid, x.patch_grid)
        kept = vispruner_compress(x.features, scores.to(x.features.device), self.retention,
                                  self.important_ratio, self.step, self.scope)
        return placed(kept, x, self.positions)
