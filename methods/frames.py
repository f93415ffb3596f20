"""Frame-level building blocks shared by the video methods: same-position similarity across frames
and cutting a video into contiguous segments.

DyCoke, HoliTom, PruneVid and FrameFusion compare each token with the token at the same grid
position in another frame; FastVID, HoliTom and PruneVid cut the frames into contiguous segments.
"""

from __future__ import annotations

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dim, in float32 (0 where either vector is zero)."""
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def same_position_similarity(x: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """(F, N, D) -> (F - offset, N): cosine of token n of frame t with token n of frame t + offset."""
    return cosine(x[:-offset], x[offset:])


def normalized(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (zero rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def segments_from_cuts(cuts: torch.Tensor, frames: int) -> list[tuple[int, int]]:
    """(F - 1,) bool, True where a segment ends after frame t -> [(start, end), ...] covering all frames."""
    ends = (cuts.nonzero().flatten() + 1).tolist() + [frames]
    starts = [0] + ends[:-1]
    return [(a, b) for a, b in zip(starts, ends) if b > a]


def segment_ids(bounds: list[tuple[int, int]], device=None) -> torch.Tensor:
    """(F,) segment index of every frame."""
    return torch.cat([torch.full((b - a,), i, dtype=torch.long, device=device)
                      for i, (a, b) in enumerate(bounds)])
