"""A deliberately literal, slow restatement of CDPruner (Zhang et al., NeurIPS 2025, arXiv:2506.10967):
Theia-4869/CDPruner 9541616, `llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images`, with this
harness's inputs and choices (methods/cdpruner.py).

For tests and benchmarks only; it does not import methods/. The token-token cosines are one dense
float64 product (a tensor op, made exactly symmetric); the relevance and the greedy fast-MAP DPP are
plain Python over lists, step by step as `encode_images` writes them:

1. rel_i = sign * mean_m cos(x_i, q_m); rel = (rel - min + 1e-6) / (max - min) over every token of the
   video (1 everywhere if max == min); with theta: rel = exp(theta / (2(1 - theta)) * rel).
2. L_ij = rel_i * cos(x_i, x_j) * rel_j, cos(x_i, x_i) = 1 exactly (per frame, or over the whole video
   with scope=video).
3. d_i = L_ii; at each step the candidates are the unpicked i with d_i > 1e-4 * L_ii; j = the first
   index of the largest d among them; e_m = (L_jm - sum over earlier steps s of c_s[j] * c_s[m]) /
   sqrt(d_j); d_m -= e_m^2. Without candidates: j = the most relevant unpicked token (lower index on
   ties), nothing updated.
4. keep = the picks, sorted.

`gap` is the smallest difference, over the steps, between the best candidate's d and the best
different one (how close a pick is to a tie); `margin` the smallest |d_i - 1e-4 L_ii| / L_ii of an
unpicked token with L_ii > 0 (how close a token is to the candidate threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EXHAUSTED = 1e-4


@dataclass
class CDPrunerResult:
    keep: list[int]  # kept flat indices, ascending
    picks: list[list[int]]  # per DPP (frame, or the video), in pick order
    output: torch.Tensor  # (M, D) the kept rows, in the input's dtype
    relevance: list[float]  # flat
    gap: float
    margin: float


def _dot(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b))


def _cosine(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(_dot(a, a)), math.sqrt(_dot(b, b))
    if na == 0 or nb == 0:
        return 0.0
    return _dot(a, b) / (na * nb)


def cosine_matrix(x: torch.Tensor, dtype=torch.float64) -> list[list[float]]:
    """cos of every pair as nested lists, exactly symmetric with an exact unit diagonal; a zero row has
    cosine 0 with everything (itself included)."""
    x = x.to(dtype)
    norms = x.norm(dim=1, keepdim=True)
    u = torch.where(norms > 0, x / torch.where(norms > 0, norms, 1), torch.zeros_like(x))
    cos = (u @ u.T).tolist()
    for i in range(len(cos)):
        for j in range(i):
            cos[i][j] = cos[j][i]
        cos[i][i] = 1.0 if float(norms[i]) > 0 else 0.0  # exactly, as in exact arithmetic
    return cos


def reference_relevance(x: torch.Tensor, question: torch.Tensor, sign: int = -1,
                        theta: float | None = None) -> list[float]:
    """(V, D) tokens, (M, D) question tokens -> V relevances."""
    tokens, texts = x.double().tolist(), question.double().tolist()
    relevance = [sign * sum(_cosine(t, q) for q in texts) / len(texts) for t in tokens]
    low, high = min(relevance), max(relevance)
    if high > low:
        relevance = [(r - low + 1e-6) / (high - low) for r in relevance]
    else:
        relevance = [1.0] * len(relevance)
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        relevance = [math.exp(alpha * r) for r in relevance]
    return relevance


def reference_dpp(x: torch.Tensor, relevance: list[float], k: int, dtype=torch.float64):
    """(n, D) tokens and their relevance -> (picks in order, gap, margin)."""
    n = x.shape[0]
    similarity = cosine_matrix(x, dtype)
    kernel = [[relevance[i] * similarity[i][j] * relevance[j] for j in range(n)] for i in range(n)]
    di2s = [kernel[i][i] for i in range(n)]
    floor = [EXHAUSTED * kernel[i][i] for i in range(n)]
    cis: list[list[float]] = []
    picks: list[int] = []
    gap = margin = math.inf
    for _ in range(k):
        for i in range(n):
            if i not in picks and kernel[i][i] > 0:
                margin = min(margin, abs(di2s[i] - floor[i]) / kernel[i][i])
        candidates = [i for i in range(n) if i not in picks and di2s[i] > floor[i]]
        if candidates:
            best = max(di2s[i] for i in candidates)
            j = min(i for i in candidates if di2s[i] == best)
            others = [di2s[i] for i in candidates if di2s[i] < best]
            if others:
                gap = min(gap, best - max(others))
            eis = [(kernel[j][m] - sum(c[j] * c[m] for c in cis)) / math.sqrt(di2s[j]) for m in range(n)]
            cis.append(eis)
            di2s = [di2s[m] - eis[m] ** 2 for m in range(n)]
        else:
            rest = [i for i in range(n) if i not in picks]
            best = max(relevance[i] for i in rest)
            j = min(i for i in rest if relevance[i] == best)
        picks.append(j)
    return picks, gap, margin


def reference_cdpruner(x: torch.Tensor, question: torch.Tensor, retention: float, scope: str = "frame",
                       theta: float | None = None, sign: int = -1, dtype=torch.float64) -> CDPrunerResult:
    """(F, N, D) tokens and (M, D) question-token embeddings."""
    frames, per_frame, dim = x.shape
    flat = x.reshape(frames * per_frame, dim)
    relevance = reference_relevance(flat, question, sign, theta)
    if scope == "video":
        k = max(1, round(retention * frames * per_frame))
        picks, gap, margin = reference_dpp(flat, relevance, k, dtype)
        all_picks, keep = [picks], sorted(picks)
    else:
        k = max(1, round(retention * per_frame))
        all_picks, keep, gap, margin = [], [], math.inf, math.inf
        for f in range(frames):
            picks, g, m = reference_dpp(x[f], relevance[f * per_frame:(f + 1) * per_frame], k, dtype)
            all_picks.append(picks)
            keep += [f * per_frame + i for i in sorted(picks)]
            gap, margin = min(gap, g), min(margin, m)
    return CDPrunerResult(keep, all_picks, flat[keep], relevance, gap, margin)
