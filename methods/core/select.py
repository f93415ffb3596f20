"""Selection as every ranked method uses it: budgets, stable top-k, original order kept."""

from __future__ import annotations

import torch


def kept_count(share: float, n: int) -> int:
    """Tokens a method keeps of n at `share`: max(1, round(share*n)) (Python round, half to even;
    at least one, so no video is ever empty)."""
    return max(1, round(share * n))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) -> (..., k) indices of the k highest scores along the last dim, in score order.

    Ties go to the lower index (a stable sort of the negated scores)."""
    return torch.sort(-scores, dim=-1, stable=True).indices[..., :k]


def top_k_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) -> (..., k) indices of the k highest scores along the last dim, ascending (the
    tokens' original order). Ties go to the lower index."""
    return top_k(scores, k).sort(dim=-1).values
