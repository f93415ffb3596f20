"""A deliberately literal, slow restatement of VisPruner (Zhang et al., ICCV 2025, arXiv:2412.01818):
Theia-4869/VisPruner aefa01a, `llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images`, with
LightCompress's parity rule and this harness's choices (methods/vispruner.py).

For tests and benchmarks only; it does not import methods/. The cosines are one dense float64 product
(a tensor op, made exactly symmetric); everything else is plain Python over lists, per image:

1. k_imp = int(k*ratio); if k_imp < k and (n - k_imp) is odd, k_imp += 1; k_div = k - k_imp.
2. order = indices by descending score, ties to the lower index; important = order[:k_imp],
   R = order[k_imp:].
3. if k_div > 0: while len(R) > k_div: r = min(step, len(R) - k_div, len(A)) with A = R[0::2],
   B = R[1::2]; score(a) = max over B of cos(a, b); A sorted by descending score (ties: earlier in A
   first); R = that order without its first r + B.
4. keep = sorted(important + R) (k_div = 0: the important tokens alone).

`gap` is the smallest difference between two consecutive scores of a round's sorted A (the whole
order decides the next round's A/B split, so every near tie matters), over all rounds and images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class VisPrunerResult:
    keep: list[int]  # kept flat indices, ascending
    output: torch.Tensor  # (M, D) the kept rows, in the input's dtype
    gap: float
    rounds: int  # matching rounds run (over all images)


def cosine_matrix(x: torch.Tensor, dtype=torch.float64) -> list[list[float]]:
    """cos of every pair as nested lists, exactly symmetric; a zero row has cosine 0 with everything."""
    x = x.to(dtype)
    norms = x.norm(dim=1, keepdim=True)
    u = torch.where(norms > 0, x / torch.where(norms > 0, norms, 1), torch.zeros_like(x))
    cos = (u @ u.T).tolist()
    for i in range(len(cos)):
        for j in range(i):
            cos[i][j] = cos[j][i]
    return cos


def reference_split(k: int, n: int, important_ratio: float) -> tuple[int, int]:
    important_token_num = int(k * important_ratio)
    if important_token_num < k and (n - important_token_num) % 2 != 0:
        important_token_num += 1
    return important_token_num, k - important_token_num


def reference_select(x: torch.Tensor, scores: torch.Tensor, k: int, important_ratio: float = 0.5,
                     step: int = 8, dtype=torch.float64) -> tuple[list[int], float, int]:
    """One image: (n, D) tokens, (n,) scores -> (kept indices ascending, gap, rounds)."""
    n = x.shape[0]
    cos = cosine_matrix(x, dtype)
    s = scores.to(dtype).tolist()
    important_token_num, diverse_token_num = reference_split(k, n, important_ratio)
    token_indices = sorted(range(n), key=lambda i: (-s[i], i))
    important_indices = token_indices[:important_token_num]
    residual_indices = token_indices[important_token_num:]
    gap, rounds = math.inf, 0
    while diverse_token_num > 0:
        R = len(residual_indices)
        a_list, b_list = residual_indices[0::2], residual_indices[1::2]
        r = min(step, R - diverse_token_num, len(a_list))
        if r <= 0:
            break
        score = [max(cos[a][b] for b in b_list) for a in a_list]
        ranked = sorted(range(len(a_list)), key=lambda i: (-score[i], i))
        for p, q in zip(ranked, ranked[1:]):
            gap = min(gap, score[p] - score[q])
        residual_indices = [a_list[i] for i in ranked[r:]] + b_list
        rounds += 1
    if diverse_token_num > 0:
        selected = important_indices + residual_indices
    else:
        selected = important_indices
    return sorted(selected), gap, rounds


def reference_vispruner(x: torch.Tensor, scores: torch.Tensor, retention: float, important_ratio: float = 0.5,
                        step: int = 8, scope: str = "frame", dtype=torch.float64) -> VisPrunerResult:
    """(F, N, D) tokens and (F, N) scores on the same grid."""
    frames, per_frame, dim = x.shape
    flat = x.reshape(frames * per_frame, dim)
    if scope == "video":
        k = max(1, round(retention * frames * per_frame))
        keep, gap, rounds = reference_select(flat, scores.reshape(-1), k, important_ratio, step, dtype)
    else:
        k = max(1, round(retention * per_frame))
        keep, gap, rounds = [], math.inf, 0
        for f in range(frames):
            kept, g, r = reference_select(x[f], scores[f], k, important_ratio, step, dtype)
            keep += [f * per_frame + i for i in kept]
            gap, rounds = min(gap, g), rounds + r
    return VisPrunerResult(keep, flat[keep], gap, rounds)
