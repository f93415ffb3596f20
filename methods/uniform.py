"""Uniform pooling: bilinear resize of each frame's token grid, then uniform pooling in time.

A baseline of this harness (no official code): per frame, a bilinear resize (align_corners=False)
of the token grid to the h x w grid, h <= w, whose size is closest to r*N (ties: the squarer grid);
below one token per frame, frames are also averaged in groups of consecutive frames. The achieved
retention is reported, not the requested one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from methods import register
from methods.core.base import Compressor, RetentionKnob, VisualInput, fraction


def target_grid(retention: float, h: int, w: int) -> tuple[int, int]:
    """The (rows, cols) grid with rows <= cols <= max side whose size is closest to r*h*w.

    Ties go to the squarer grid (smaller cols - rows), then to the larger grid.
    """
    side = max(h, w)
    target = retention * h * w
    best = None
    for rows in range(1, side + 1):
        for cols in range(rows, side + 1):
            key = (abs(rows * cols - target), cols - rows, -rows * cols)
            if best is None or key < best[0]:
                best = (key, (rows, cols))
    return best[1]


def pool_time(tokens: torch.Tensor, groups: int) -> torch.Tensor:
    """Average (F, D) tokens over `groups` runs of consecutive frames (sizes differ by <= 1)."""
    frames = tokens.shape[0]
    bounds = [round(g * frames / groups) for g in range(groups + 1)]
    return torch.stack([tokens[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])


@register
@dataclass
class Uniform(Compressor):
    name = "uniform"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    retention: float = fraction(0.25, "share of tokens kept (the closest grid per frame)")

    def compress(self, x: VisualInput) -> torch.Tensor:
        frames, n, dim = x.features.shape
        h, w = x.grid
        rows, cols = target_grid(self.retention, h, w)  # (1, 1) when r*n < 1
        grid = x.features.view(frames, h, w, dim).permute(0, 3, 1, 2)
        pooled = nnf.interpolate(grid.float(), size=(rows, cols), mode="bilinear", align_corners=False)
        tokens = pooled.to(x.features.dtype).permute(0, 2, 3, 1).reshape(frames * rows * cols, dim)
        if self.retention * n < 1:  # fewer than one token per frame: pool frames in time as well
            groups = min(frames, max(1, round(self.retention * n * frames)))
            tokens = pool_time(tokens, groups)
        return tokens
