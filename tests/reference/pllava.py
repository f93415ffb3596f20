"""A deliberately literal, slow restatement of PLLaVA pooling (Xu et al., arXiv:2404.16994), as
methods/pllava.py states it.

For tests and benchmarks only; it does not import methods/. X (F, N = h*w, D) is viewed as
(D, F, h, w) and every output cell (t, i, j) of the (D, T', h', w') result is the plain average of
its adaptive window, one Python loop per cell, in float64 (the definition of
torch.nn.functional.adaptive_avg_pool3d: output i of a dimension In -> Out covers the inputs
[floor(i*In/Out), ceil((i+1)*In/Out))). T' = max(1, round(F / temporal)); h' x w' is the grid with
h' <= w' <= max(h, w) whose size is closest to r*h*w*temporal, ties to the squarer grid, then to the
larger one (as `uniform`, methods/uniform.py).
"""

from __future__ import annotations

import math

import torch


def reference_grid(retention: float, h: int, w: int) -> tuple[int, int]:
    target = retention * h * w
    best_rows, best_cols = None, None
    for rows in range(1, max(h, w) + 1):
        for cols in range(rows, max(h, w) + 1):
            if best_rows is None:
                best_rows, best_cols = rows, cols
                continue
            off, best_off = abs(rows * cols - target), abs(best_rows * best_cols - target)
            if off < best_off:
                better = True
            elif off > best_off:
                better = False
            elif cols - rows != best_cols - best_rows:
                better = cols - rows < best_cols - best_rows  # squarer
            else:
                better = rows * cols > best_rows * best_cols  # larger
            if better:
                best_rows, best_cols = rows, cols
    return best_rows, best_cols


def reference_windows(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """[start, end) of each adaptive-pooling window."""
    return [(math.floor(i * size_in / size_out), math.ceil((i + 1) * size_in / size_out))
            for i in range(size_out)]


def reference_shape(frames: int, grid: tuple[int, int], retention: float, temporal: int):
    rows, cols = reference_grid(retention * temporal, grid[0], grid[1])
    return max(1, round(frames / temporal)), rows, cols


def reference_pllava(features: torch.Tensor, grid: tuple[int, int], retention: float,
                     temporal: int = 1) -> torch.Tensor:
    """(F, N, D) -> (T'*h'*w', D), float64, frame-major, row-major."""
    frames, _, dim = features.shape
    h, w = grid
    x = features.double().reshape(frames, h, w, dim)
    out_frames, rows, cols = reference_shape(frames, grid, retention, temporal)
    out = []
    for t0, t1 in reference_windows(frames, out_frames):
        for i0, i1 in reference_windows(h, rows):
            for j0, j1 in reference_windows(w, cols):
                total = torch.zeros(dim, dtype=torch.float64)
                count = 0
                for t in range(t0, t1):
                    for i in range(i0, i1):
                        for j in range(j0, j1):
                            total += x[t, i, j]
                            count += 1
                out.append(total / count)
    return torch.stack(out)
