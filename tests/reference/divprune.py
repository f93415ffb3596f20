"""A deliberately literal, slow restatement of DivPrune (Alvar et al., CVPR 2025, arXiv:2503.02175).

For tests and benchmarks only; it does not import methods/divprune.py. The cosine distances are
one dense product (a tensor op, float64 by default, as in the official code); the greedy selection
is plain Python over lists, step by step as methods/divprune.py words it: the minimum distance of every
candidate to the selected set is recomputed from scratch at every step (the official code does the
same with tensor ops: O(k^2 n)). Ties go to the lowest index (torch.argmax in the official code);
the distance matrix is made exactly symmetric, so that exact ties (a mutually nearest pair) are ties
here as in exact arithmetic. Choices of this harness (methods/divprune.py): picked tokens are never
picked again, the first pick uses the minimum over the *other* tokens, zero tokens have cosine 0 to
everything, at least one token.

`official_style_divprune` restates the official function's structure with tensor ops (no mask,
second-smallest entry of each column including the self-distance, re-minimum over all selected
rows each step); a timing comparator and a check that the masking changes nothing on ordinary
input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DivPruneResult:
    picks: list[int]  # in pick order
    keep: list[int]  # sorted
    gap: float  # smallest (best - second best) score over the steps: how close to a tie


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / torch.where(norms > 0, norms, 1), torch.zeros_like(x))


def distance_matrix(x: torch.Tensor, dtype=torch.float64) -> list[list[float]]:
    """1 - cos, exactly symmetric (as in exact arithmetic): each pair's product is used both ways."""
    u = unit_rows(x.to(dtype))
    dist = (1 - u @ u.T).tolist()
    for i in range(len(dist)):
        for j in range(i):
            dist[i][j] = dist[j][i]
    return dist


def reference_select(x: torch.Tensor, k: int, dtype=torch.float64) -> DivPruneResult:
    """Greedy max-min on (n, D) tokens: k picks.

    `gap` is the smallest difference between a step's best score and the best *different* score:
    exact ties (a mutually nearest pair at the first step always ties) go to the lower index on
    both sides; near ties are what round-off can flip.
    """
    n = x.shape[0]
    dist = distance_matrix(x, dtype)
    picks: list[int] = []
    gap = math.inf
    for step in range(k):
        scores = {}
        for j in range(n):
            if j in picks:
                continue
            if step == 0:  # smallest distance to every other token
                others = [dist[i][j] for i in range(n) if i != j]
                scores[j] = min(others) if others else math.inf
            else:  # smallest distance to the selected set
                scores[j] = min(dist[s][j] for s in picks)
        best_score = max(scores.values())
        best = min(j for j, score in scores.items() if score == best_score)  # first maximum
        below = [score for score in scores.values() if score < best_score]
        if below:
            gap = min(gap, best_score - max(below))
        picks.append(best)
    return DivPruneResult(picks, sorted(picks), gap)


def reference_budget(retention: float, n: int) -> int:
    return max(1, round(retention * n))


@dataclass
class Compressed:
    output: torch.Tensor
    keep: list[int]  # kept flat indices
    gap: float


def reference_divprune(x: torch.Tensor, retention: float, scope: str = "video",
                       dtype=torch.float64) -> Compressed:
    frames, per_frame, dim = x.shape
    flat = x.reshape(frames * per_frame, dim)
    if scope == "video":
        result = reference_select(flat, reference_budget(retention, frames * per_frame), dtype)
        keep, gap = result.keep, result.gap
    else:
        keep, gap = [], math.inf
        for f in range(frames):
            result = reference_select(x[f], reference_budget(retention, per_frame), dtype)
            keep += [f * per_frame + i for i in result.keep]
            gap = min(gap, result.gap)
    return Compressed(flat[keep], keep, gap)


def official_style_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """(n, D) -> (k,) picks, structured like the official function: the full distance matrix,
    then per step the minimum over *all* selected rows again; nothing masked."""
    u = x.float() / x.float().norm(dim=1, keepdim=True)
    dist = 1.0 - u @ u.T
    picks = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = dist.index_select(0, picks[:i]).min(dim=0).values
        picks[i] = torch.argmax(scores)
    return picks
