"""Top-k selection as every attention-ranked method uses it: stable ties, original order kept."""

from __future__ import annotations

import torch


def top_k_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) -> (..., k) indices of the k highest scores along the last dim, ascending.

    Ties go to the lower index (a stable sort of the negated scores).
    """
    order = torch.sort(-scores, dim=-1, stable=True).indices[..., :k]
    return order.sort(dim=-1).values
