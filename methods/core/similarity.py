"""Similarities and frames, shared by the methods: unit rows and cosines, same-position similarity
across frames, cutting a video into contiguous segments, and the one check of a features tensor.

Every method computes its decisions (similarities, thresholds, rankings) in float32, or float64 for
float64 input (`compute_dtype`). DyCoke, HoliTom, PruneVid and FrameFusion compare each token with
the token at the same grid position in another frame; FastVID, HoliTom and PruneVid cut the
frames into contiguous segments.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decisions are made in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def checked_features(value, name: str = "features", shape: str = "(F, N, D)") -> torch.Tensor:
    """`value` as a non-empty floating tensor of the given rank, in the compute dtype; TypeError or
    ValueError naming `name` and what was expected otherwise (for methods used on their own)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != shape.count(",") + 1 or 0 in value.shape:
        raise ValueError(f"{name}: expected a non-empty {shape} tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    return value.to(compute_dtype(value.dtype))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm, in x's dtype; zero rows stay zero (cosine 0 to everything)."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norms > 0, norms, 1.0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dim, in float32 (0 where either vector is zero)."""
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def same_position_similarity(x: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """(F, N, D) -> (F - offset, N): cosine of token n of frame t with token n of frame t + offset."""
    return cosine(x[:-offset], x[offset:])


def normalized(x: torch.Tensor) -> torch.Tensor:
    """Unit rows in float32 (zero rows stay zero)."""
    return unit_rows(x.float())


def segments_from_cuts(cuts: torch.Tensor, frames: int) -> list[tuple[int, int]]:
    """(F - 1,) bool, True where a segment ends after frame t -> [(start, end), ...] covering all frames."""
    ends = (cuts.nonzero().flatten() + 1).tolist() + [frames]
    starts = [0] + ends[:-1]
    return [(a, b) for a, b in zip(starts, ends) if b > a]


def segment_ids(bounds: list[tuple[int, int]], device=None) -> torch.Tensor:
    """(F,) segment index of every frame."""
    return torch.cat([torch.full((b - a,), i, dtype=torch.long, device=device)
                      for i, (a, b) in enumerate(bounds)])
