"""Attention-score top-k: keep the tokens whose patches receive the most vision-encoder attention.

A baseline of this harness (no official code): the adapter supplies each patch's received
attention in the last vision layer the model uses; the 27x27 map is pooled to the feature grid with
the same bilinear resize as the features, and the top k per frame are kept in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from methods import register
from methods.core.base import Compressor, RetentionKnob, VisualInput, fraction
from methods.core.select import kept_count, top_k_ascending


def pooled_scores(patch_scores: torch.Tensor, grid: tuple[int, int],
                  patch_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(F, H*W) patch scores -> (F, h*w) scores on the feature grid (bilinear), float32.

    (F, H*W, C) per-patch vectors (e.g. `patch_keys`) -> (F, h*w, C): each channel is resized
    the same way, as LLaVA-OneVision pools its features (27x27 -> 14x14). `patch_grid` (H, W)
    defaults to a square; for Qwen2.5-VL's 2x2 patch merge (H, W) = (2h, 2w), where the bilinear
    resize is exactly the mean of each token's four patches.
    """
    frames, patches = patch_scores.shape[:2]
    if patch_grid is None:
        side = round(patches ** 0.5)
        patch_grid = (side, side)
    if patch_grid[0] * patch_grid[1] != patches:
        raise ValueError(f"patch scores of {patches} patches do not form the {patch_grid[0]}x{patch_grid[1]} "
                         "patch grid (VisualInput.patch_grid)")
    channels = patch_scores.shape[2] if patch_scores.dim() == 3 else 1
    maps = patch_scores.float().reshape(frames, *patch_grid, channels).permute(0, 3, 1, 2)
    pooled = nnf.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
    pooled = pooled.permute(0, 2, 3, 1).reshape(frames, grid[0] * grid[1], channels)
    return pooled if patch_scores.dim() == 3 else pooled.squeeze(-1)


@register
@dataclass
class TopK(Compressor):
    name = "topk"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    needs = frozenset({"patch_scores"})
    retention: float = fraction(0.25, "share of each frame's tokens kept")

    def compress(self, x: VisualInput) -> torch.Tensor:
        if x.patch_scores is None:
            raise ValueError("topk needs the vision encoder's patch attention (patch_scores)")
        frames, n, dim = x.features.shape
        k = kept_count(self.retention, n)
        keep = top_k_ascending(pooled_scores(x.patch_scores, x.grid, x.patch_grid), k)
        return x.features.gather(1, keep.to(x.features.device)[..., None].expand(-1, -1, dim)).flatten(0, 1)
