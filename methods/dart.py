"""DART: prune video tokens inside the LLM by duplication with a few pivot tokens.

Before decoder layer K, the video and text tokens with the largest key norms at layer K-1 become
pivots; each pivot keeps the video tokens least similar to it (its duplicates are dropped), so the
kept set covers what the pivots do not already say. Image pivots stay; text pivots stay ordinary text.

Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025, arXiv:2502.11494.
Official code followed: ZichenWen1/DART, read at its commit 5a19452 (2025-08-31) in the fork
xqy1111111/DART: `llava/model/language_model/modeling_llama_self.py::DART.forward` and
`DART.get_retained_image_token` (layer K-1's decoder layer returns its key states as "debug"
outputs), `Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py::DART.get_retained_image_token`
(the budget from `reduction_ratio`), `Qwen2_5-VL/eval_scripts/lmms_eval.sh` (pruned_layer 2,
pivot_image_token 4, pivot_text_token 4); ModelTC/LightCompress 9701d03
`llmc/compression/token_reduction/dart.py` runs the same algorithm.

Algorithm (video tokens V, text = every token after the video run):
1. Inputs from layer K-1: its keys after the rotary embedding (key-value heads concatenated: the
   official repeats them for grouped queries, which scales every L1 norm alike) and its output
   hidden states through the model's final RMSNorm (`self.norm`), h.
2. Picks per pivot t = int(keep*V / (p_i + p_t)) (the official Qwen2.5-VL `TOKEN_TOPK`, V*(1 -
   reduction_ratio)/(p_i + p_t) truncated, keep*V not rounded first; LLaVA-1.5: 128 // 8 = 16).
3. Pivots: the p_i video tokens and the p_t text tokens with the largest key L1 norm.
4. C = the video tokens minus the image pivots. For each pivot in turn, the t tokens of C with the
   lowest cos(h_pivot, h_c) are kept and leave C.
5. Kept video tokens: image pivots and picks, p_i + (p_i + p_t)*t of them (4 + 8*t; LLaVA 132, not
   the paper's 128: the code wins), in their original order; text pivots stay as text. Layers
   >= K see the kept video tokens and every other token at their original position ids
   (`position_ids = keep_indexs`, the driver's rule) and cache only those.

Deviations and choices:
- Video (choice of this harness, as LightCompress): the official code is image-only (its
  Qwen2.5-VL evaluation locates `<|image_pad|>` tokens only); here the F x N video tokens are one run
  with global pivots and the Qwen2.5-VL budget keep*V. The `keep` knob is 1 - reduction_ratio; the
  official LLaVA-1.5 budget of 128 of 576 tokens is keep = 0.222.
- Pivot order: the official code iterates a Python set of sequence indices; here pivots go in
  ascending sequence index (image pivots first), choice of this harness.
- Ties (official `topk`: unspecified): key norms and cosines go to the lower index.
- Cosines and norms in float32 (official: the model dtype). When C runs out, a pivot takes what is
  left (official `topk` would fail); fewer text tokens than p_t make every text token a pivot (the
  harness's prompts always have more; `planned` assumes p_t).
- `retention=` sets keep by matching prefill FLOPs (rho_flops, as FastV): the per-layer counts are
  planned exactly from V.
- The final norm comes from the driver (`PrefillView.final_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import Compressor, RetentionKnob, check_layer, fraction, knob, layer
from methods.core.decoder import Keep, PrefillView
from methods.core.flops import LLMShape
from methods.core.select import top_k

__all__ = ["DART", "DARTPolicy", "dart_counts", "dart_select", "picks_per_pivot"]


def picks_per_pivot(keep: float, video: int, pivot_image: int, pivot_text: int) -> int:
    """t = int(keep*V / (p_i + p_t)): the video tokens each pivot keeps."""
    return int(keep * video / (pivot_image + pivot_text))


def dart_counts(keep: float, video: int, pivot_image: int, pivot_text: int) -> int:
    """Video tokens DART keeps of V: min(V, p_i + (p_i + p_t)*t)."""
    image = min(pivot_image, video)
    picks = picks_per_pivot(keep, video, pivot_image, pivot_text)
    return image + min(video - image, (pivot_image + pivot_text) * picks)


def dart_select(keys: torch.Tensor, normed: torch.Tensor, video: torch.Tensor, text: torch.Tensor,
                pivot_image: int, pivot_text: int, picks: int) -> torch.Tensor:
    """Kept video tokens (indices into `video`, ascending).

    keys (n, dk): layer K-1's keys after the rotary embedding; normed (n, D): its output through the
    final norm; video, text: sequence indices of the video tokens and of the text after them."""
    norms = keys.float().abs().sum(-1)
    image_pivots = top_k(norms[video], min(pivot_image, len(video))).sort().values  # into `video`
    text_pivots = text[top_k(norms[text], min(pivot_text, len(text))).sort().values]
    pivots = torch.cat([video[image_pivots], text_pivots])  # ascending sequence index
    h = normed.float()
    unit = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cos = unit[pivots] @ unit[video].T  # (P, v)
    kept = torch.zeros(len(video), dtype=torch.bool, device=video.device)
    kept[image_pivots] = True
    available = ~kept
    left = len(video) - len(image_pivots)
    for row in cos:
        take = min(picks, left)
        if take <= 0:
            break
        score = torch.where(available, -row, -torch.inf)
        chosen = top_k(score, take)
        kept[chosen] = True
        available[chosen] = False
        left -= take
    return kept.nonzero().flatten()


@dataclass
class DARTPolicy:
    """Before layer `layer`, keep DART's video tokens (pivots at layer - 1)."""

    layer: int
    keep: float
    pivot_image: int
    pivot_text: int
    depth: int

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def act(self, view: PrefillView) -> Keep | None:
        video = len(view.video)
        if dart_counts(self.keep, video, self.pivot_image, self.pivot_text) >= video:
            return None
        picks = picks_per_pivot(self.keep, video, self.pivot_image, self.pivot_text)
        kept = dart_select(view.keys(), view.final_norm()[0], view.video, view.query,
                           self.pivot_image, self.pivot_text, picks)
        return Keep(kept)

    def planned(self, video_tokens: int, groups=None) -> list[int]:
        kept = dart_counts(self.keep, video_tokens, self.pivot_image, self.pivot_text)
        return [video_tokens] * self.layer + [kept] * (self.depth - self.layer)


@register
@dataclass
class DART(Compressor):
    """`+method=dart [method.keep=0.222]` or `+method=dart retention=<r>` (prefill FLOPs)."""

    name = "dart"
    stages = frozenset({"prefill"})
    # a requested retention sets keep by matching prefill FLOPs (rho_flops)
    retention_knob = RetentionKnob("keep", measure="rho_flops")
    label_knobs = ("layer", "keep")
    layer: int = layer(2, "layers 0..layer-1 see every video token (official pruned_layer; 2 on every model)")
    keep: float = fraction(0.222, "video share budgeted from `layer` on, keep*V (official 1 - reduction_ratio; "
                           "LLaVA-1.5: 128/576)")
    pivot_image: int = knob(4, "video pivots (official pivot_image_token)", kind="integer", low=1)
    pivot_text: int = knob(4, "text pivots (official pivot_text_token)", kind="integer", low=0)

    def prefill_policy(self, llm: LLMShape) -> DARTPolicy:
        check_layer("dart.layer", self.layer, llm.layers)
        return DARTPolicy(self.layer, self.keep, self.pivot_image, self.pivot_text, llm.layers)
