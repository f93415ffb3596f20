"""EVS (Efficient Video Sampling): drop the video tokens that changed least since the previous frame.

Each token scores 1 - cos with the token at the same grid position one frame earlier (the first
frame always survives); the K highest-scoring tokens of the whole video are kept in original order.
Attention-free and question-free: a visual stage on the LLM-input video tokens.

Paper: Bagrov et al. (NVIDIA), "Efficient Video Sampling: Pruning Temporally Redundant Tokens for
Faster VLM Inference", arXiv:2510.14624. Official code followed: vllm-project/vllm, read at commit
094f117, `vllm/multimodal/evs.py` (`compute_retained_tokens_count`, `compute_retention_mask`,
`compute_mrope_for_media`, `recompute_mrope_positions`), applied per video by
`vllm/model_executor/models/qwen2_5_vl.py` (`Qwen2_5_VLForConditionalGeneration.
_postprocess_video_embeds_evs`, read at commit 002d181); the knob is vLLM's
`MultiModalConfig.video_pruning_rate` q (0 <= q < 1; None, the default, is off).

On (T, N, D) video tokens of a (h, w) grid, as `compute_retention_mask` does:
1. d[t, n] = 1 - cos(x[t, n], x[t-1, n]) for t >= 1, d[0, n] = 255 (the first frame always survives).
2. K = max(N, int(T*N*(1 - q))) (`compute_retained_tokens_count`: at least one frame's worth).
3. A stable descending argsort of d flattened in (t, h, w) order (ties: the lower flat index); the
   first K are kept, as a mask: the output is in original (frame-major, row-major) order.
A zero token has cosine 0 (d = 1), as `torch.nn.functional.cosine_similarity` gives.

Models:
- Qwen2.5-VL (the official target): T = the temporal patches (grid_t), N = (H/28)(W/28) merger
  outputs; kept tokens keep their original M-RoPE (t, h, w) ids (`VideoTokens`), as vLLM's
  `compute_mrope_for_media` positions do. vLLM's `recompute_mrope_positions` then starts the text
  after the video at vision_start + 1 + llm_grid_w (an offset from the grid width alone, whatever
  the video's temporal extent); choice of this harness: the text after the video keeps the
  unpruned model's ids (the Qwen2.5-VL adapter places it as `get_rope_index` does uncompressed).
- LLaVA-OneVision (choice of this harness: no official port): T = the F frames, the 14x14 pooled
  grid (a spatial merge size of 1); the kept tokens take consecutive positions (a plain (M, D)
  tensor), as every visual-stage output in the standard LLaVA concatenation.
- knob `positions` (choice of this harness): compact | original overrides that rule; null (the
  default) follows it. A visual stage is not told the model: M-RoPE inputs are recognised by their
  grid (`mrope_input`: Qwen2.5-VL's tokens are 2x2 merges of its patch grid).

Deviations and choices:
- retention = 1 - q (the harness's direct retention knob; q = 1 - retention is formed in Python
  floats and K = max(N, int(T*N*(1 - q))) computed as vLLM does, so the truncation is vLLM's own).
  retention = 1 (q = 0, which vLLM treats as off) keeps every token: the same logits as `none`.
- decisions in float32 (float64 for float64 input); vLLM computes the cosine in the model dtype.
- rho_tok = K / (T*N): 1 - q unless the one-frame floor (K >= N) applies.

Cost: one pass over X for the norms and one for the (T-1)*N same-position dot products (a few frames
per product, so its temporary stays small), then one sort of T*N values; no host synchronisation
(benchmarks/bench_evs.py: about the floor at 32x196x3584).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import (Compressor, RetentionKnob, VideoTokens, VisualInput, fraction, placed,
                               positions_knob)
from methods.core.similarity import checked_features

__all__ = ["FIRST_FRAME", "evs_budget", "evs_compress", "evs_dissimilarity"]

FIRST_FRAME = 255.0  # vLLM's dissimilarity of the first frame's tokens: above any 1 - cos (<= 2)


def evs_budget(retention: float, frames: int, per_frame: int) -> int:
    """K tokens kept of frames*per_frame: vLLM's `compute_retained_tokens_count` with q = 1 - retention."""
    q = 1.0 - retention
    return max(per_frame, int(frames * per_frame * (1 - q)))


def evs_dissimilarity(features: torch.Tensor) -> torch.Tensor:
    """(T, N, D) -> (T, N): 1 - cos with the same grid position one frame earlier; FIRST_FRAME for t = 0
    (in the compute dtype: float32, float64 for float64 input). A zero token has cosine 0."""
    x = checked_features(features)
    frames, per_frame, dim = x.shape
    d = torch.full((frames, per_frame), FIRST_FRAME, dtype=x.dtype, device=x.device)
    if frames > 1:
        norms = torch.linalg.vector_norm(x, dim=-1)
        dots = torch.empty(frames - 1, per_frame, dtype=x.dtype, device=x.device)
        step = max(1, (1 << 20) // (per_frame * dim))  # frames per product: its temporary stays small
        for t in range(1, frames, step):
            end = min(frames, t + step)
            dots[t - 1:end - 1] = torch.linalg.vecdot(x[t:end], x[t - 1:end - 1])
        scale = norms[1:] * norms[:-1]
        d[1:] = 1.0 - torch.where(scale > 0, dots / scale, 0.0)
    return d


@torch.no_grad()
def evs_compress(features: torch.Tensor, retention: float = 0.25) -> VideoTokens:
    """(T, N, D) -> VideoTokens: the K most changed tokens (module docstring), in original order, with
    their flat indices into the T*N input as positions."""
    EVS.check_knobs(retention=retention)
    frames, per_frame, dim = checked_features(features).shape
    k = evs_budget(retention, frames, per_frame)
    order = torch.sort(evs_dissimilarity(features).flatten(), descending=True, stable=True).indices
    keep = order[:k].sort().values
    return VideoTokens(features.reshape(frames * per_frame, dim).index_select(0, keep), keep)


@register
@dataclass
class EVS(Compressor):
    """`+method=evs retention=r` (vLLM's video_pruning_rate q = 1 - r)."""

    name = "evs"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    retention: float = fraction(0.25, "share of video tokens kept, 1 - video_pruning_rate (at least one frame)")
    positions: str | None = positions_knob()

    def compress(self, x: VisualInput) -> torch.Tensor | VideoTokens:
        per_frame = x.features.shape[1]
        if per_frame != x.grid[0] * x.grid[1]:
            raise ValueError(f"evs: {per_frame} tokens per frame do not form the {x.grid[0]}x{x.grid[1]} grid")
        return placed(evs_compress(x.features, self.retention), x, self.positions)
