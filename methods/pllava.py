"""PLLaVA pooling: adaptive 3-D average pooling of the video tokens in space and time.

The video tokens X (F, 14, 14, D) are viewed as (D, F, 14, 14) and average-pooled adaptively to
(D, T', h, w); the LLM sees the T'*h*w pooled tokens frame-major, row-major, at consecutive positions.

Paper: Xu et al., "PLLaVA: Parameter-free LLaVA Extension from Images to Videos for Video Dense
Captioning", arXiv:2404.16994 (2024). Official code followed: magic-research/PLLaVA, read at commit
6f49fd2, `models/pllava/modeling_pllava.py` (`PllavaMultiModalProjector.forward`: projector, then
`rearrange -> (videos, D, T, h, w)`, `nn.AdaptiveAvgPool3d(pooling_shape)`, `rearrange -> (t h w) d`),
`tasks/eval/model_utils.py` and `scripts/eval.sh` (video default `pooling_shape=(16, 12, 12)`, 16 frames).

Knobs: `retention` r and `temporal` (T' = max(1, round(F / temporal)), default 1 = every frame);
h x w is `uniform`'s `target_grid(r * temporal)`: the grid with h <= w <= 14 closest to
r * 196 * temporal tokens per output frame, ties to the squarer (then the larger) grid.

Deviations and choices, with reasons:
- What is pooled (choice of this harness): X after the projector *and* LLaVA-OneVision's 2x2
  bilinear pool (14x14 per frame). The official code pools the projector output of its own model's full
  patch grid (24x24 CLIP patches) directly.
- Pooling shape (choice of this harness): h x w follows `retention` (and `temporal`) instead of the
  official fixed (16, 12, 12). T' is `max(1, round(F / temporal))` with Python's round (half to even: F=5,
  temporal=2 gives 2; choice of this harness: F / temporal alone does not say how to round).
- Fewer than one token per output frame (r * 196 * temporal < 1) still keeps one (a 1x1 grid):
  only `temporal` pools time, so the achieved retention is then above r.
- Computation: the 3-D adaptive average is separable, so it is computed as `adaptive_avg_pool2d`
  over each frame's grid (`temporal` > 1: over the mean of each time window's frames). Same
  windows (output i covers input [floor(i*In/Out), ceil((i+1)*In/Out))) and the same value as
  `adaptive_avg_pool3d` up to float round-off; the channels-last 2-D kernel reads X in its own
  (F, N, D) layout, while the 3-D call needs a transposed copy of X and is tens of times slower
  on the CPU (benchmarks/bench_pllava.py).
- Precision: means are computed in float32 (float64 for float64 input; the official code pools in
  the model dtype); the output has the input's dtype. Positions are contiguous, as in the official
  code (`position_ids = attention_mask.cumsum(-1) - 1` over the pooled sequence).
- retention=1, temporal=1 is the identity (14x14, every frame): the input tokens are returned as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from methods import register
from methods.core.base import Compressor, RetentionKnob, VisualInput, fraction, knob
from methods.uniform import target_grid

__all__ = ["pllava_pool", "pooling_shape", "windows"]


def pooling_shape(frames: int, grid: tuple[int, int], retention: float, temporal: int) -> tuple[int, int, int]:
    """(T', h, w): the output frames and per-frame grid for F frames of `grid` tokens."""
    rows, cols = target_grid(retention * temporal, *grid)
    return max(1, round(frames / temporal)), rows, cols


@torch.no_grad()
def pllava_pool(features: torch.Tensor, grid: tuple[int, int], retention: float,
                temporal: int = 1) -> torch.Tensor:
    """(F, N = h*w, D) video tokens -> (T'*h'*w', D) pooled tokens, frame-major, row-major."""
    PLLaVA.check_knobs(retention=retention, temporal=temporal)
    frames, n, dim = features.shape
    height, width = grid
    if height * width != n:
        raise ValueError(f"pllava: {n} tokens per frame do not form the {height}x{width} grid")
    out_frames, rows, cols = pooling_shape(frames, grid, retention, temporal)
    if (out_frames, rows, cols) == (frames, height, width):
        return features.flatten(0, 1)  # every window is one token
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    x = features.to(compute)
    if out_frames == frames:
        return _pool_space(x, grid, rows, cols).flatten(0, 1).to(features.dtype)
    # time: output frame t pools the mean of its window of frames. One window at a time keeps the
    # intermediate at one frame; a whole (F, h', w', D) or (T', 14, 14, D) intermediate costs more
    # than the pooling itself on the CPU (a fresh allocation of that size page-faults).
    out = torch.empty(out_frames, rows * cols, dim, dtype=compute, device=x.device)
    for t, (start, end) in enumerate(windows(frames, out_frames)):
        out[t] = _pool_space(x[start:end].mean(dim=0, keepdim=True), grid, rows, cols)[0]
    return out.flatten(0, 1).to(features.dtype)


def _pool_space(x: torch.Tensor, grid: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """(F, h*w, D) -> (F, rows*cols, D): adaptive average pooling of each frame's grid."""
    frames, _, dim = x.shape
    if (rows, cols) == tuple(grid):
        return x
    # (F, h, w, D) seen as (F, D, h, w) in channels-last layout: no copy of X
    maps = x.view(frames, *grid, dim).permute(0, 3, 1, 2)
    pooled = nnf.adaptive_avg_pool2d(maps, (rows, cols))  # (F, D, rows, cols)
    return pooled.permute(0, 2, 3, 1).reshape(frames, rows * cols, dim)


def windows(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """[start, end) of each adaptive-pooling window, as `adaptive_avg_pool*d` cuts them:
    output i covers [floor(i*In/Out), ceil((i+1)*In/Out))."""
    return [((i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)) for i in range(size_out)]


@register
@dataclass
class PLLaVA(Compressor):
    """`+method=pllava retention=r [method.temporal=t]`."""

    name = "pllava"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    retention: float = fraction(0.25, "share of tokens kept")
    temporal: int = knob(1, "frames pooled into one (T' = round(F / temporal))", kind="integer", low=1)

    def compress(self, x: VisualInput) -> torch.Tensor:
        return pllava_pool(x.features, x.grid, self.retention, self.temporal)
