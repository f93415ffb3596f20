"""A deliberately literal, slow restatement of EVS (Bagrov et al., arXiv:2510.14624) as vLLM codes it
(vllm-project/vllm 094f117, `vllm/multimodal/evs.py`: `compute_retained_tokens_count`,
`compute_retention_mask`), with this harness's retention = 1 - q (methods/evs.py).

For tests and benchmarks only; it does not import methods/. Python loops over frames and grid
positions, float64 dot products; a zero token has cosine 0 (as torch's cosine_similarity gives).

1. d[t][n] = 255 for t = 0, else 1 - cos(x[t][n], x[t-1][n]).
2. K = max(N, int(T*N*(1 - q))), q = 1 - retention.
3. Flat indices sorted by descending d, ties to the lower index (a stable descending argsort); the
   first K, in ascending order.

`gap` is d of the K-th kept token minus d of the first dropped one: how close the cut is to a tie
(0 for an exact tie, which both sides break by index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class EVSResult:
    keep: list[int]  # kept flat indices, ascending
    output: torch.Tensor  # (K, D) the kept rows, in the input's dtype
    dissimilarity: list[float]  # d, flat in (t, n) order
    gap: float


def retained_tokens_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    total_tokens = tokens_per_frame * num_frames
    evs_num_tokens = int(total_tokens * (1 - q))
    return max(tokens_per_frame, evs_num_tokens)


def _cosine(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(v * v for v in a))
    nb = math.sqrt(sum(v * v for v in b))
    if na == 0 or nb == 0:
        return 0.0
    return sum(p * q for p, q in zip(a, b)) / (na * nb)


def reference_evs(x: torch.Tensor, retention: float) -> EVSResult:
    frames, per_frame, dim = x.shape
    values = x.double().tolist()
    d = []
    for t in range(frames):
        for n in range(per_frame):
            d.append(255.0 if t == 0 else 1.0 - _cosine(values[t][n], values[t - 1][n]))
    q = 1.0 - retention
    k = retained_tokens_count(per_frame, frames, q)
    order = sorted(range(frames * per_frame), key=lambda i: (-d[i], i))
    keep = sorted(order[:k])
    gap = d[order[k - 1]] - d[order[k]] if k < len(order) else math.inf
    return EVSResult(keep, x.reshape(-1, dim)[keep], d, gap)
