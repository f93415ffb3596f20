"""A deliberately literal, slow restatement of HoliTom, for tests only.

Written from the paper (Shao et al., NeurIPS 2025, arXiv:2505.21334) and the official code
(cokeshao/HoliTom `holitom/llava_arch.py`, `holitom/modeling_qwen2.py`, read at commit e9b2972),
with the harness's documented choices (methods/holitom.py
docstring: dominant_share = 1 - D, every frame in position order with a window's static tokens in
its first frame, stable lower-index ties, the newline outside the merged span). It does not import
methods/holitom.py or methods/core/clustering.py: Python loops over tokens, pairs and frames, float64,
explicit distances; the official DP loop is copied as it is.

Each result reports `margin`: the smallest distance of a decision from flipping (|cos - tau|,
gaps between the last chosen and the first rejected DPC score, between densities, between the
best and the second-best centre, between the kept and dropped attention), so a test can skip
inputs whose decisions float32 round-off could legitimately flip (the implementation decides in
float32). Patch-score selections have no margin: both sides rank the same given values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NOISE = 1e-6


class Noise:
    """The DPC density tie-break noise, drawn as the harness draws it: one torch.rand of the
    clustering call's (groups, tokens) shape per call, float32 on the CPU, times 1e-6."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def draw(self, groups: int, tokens: int) -> torch.Tensor:
        if self.generator is None:
            return torch.zeros(groups, tokens, dtype=torch.float64)
        return (torch.rand((groups, tokens), generator=self.generator, dtype=torch.float32) * NOISE).double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = math.sqrt(float((a * a).sum())), math.sqrt(float((b * b).sum()))
    return float((a * b).sum()) / max(na * nb, 1e-12)


@dataclass
class Clustered:
    centres: list[int]  # ascending indices into the clustered tokens
    values: list[torch.Tensor]  # merged token of each centre
    margin: float


def dpc_merge(tokens: list[torch.Tensor], clusters: int, knn: int, beta: float,
              noise: torch.Tensor) -> Clustered:
    """DPC-kNN (TCFormer form, k = min(knn, clusters) nearest incl. self) to `clusters` centres in
    position order; every other token joins its nearest centre (first on ties); a centre becomes
    beta·centre + (1 - beta)·mean(members), or stays itself without members."""
    n, channels = len(tokens), tokens[0].shape[0]
    k = min(knn, clusters, n)
    dist = [[math.sqrt(float(((tokens[i] - tokens[j]) ** 2).sum())) / math.sqrt(channels)
             for j in range(n)] for i in range(n)]
    base, density = [], []
    for i in range(n):
        nearest = sorted(dist[i])[:k]
        base.append(math.exp(-sum(d * d for d in nearest) / k))
        # the official density is float32 and the noise is added in float32: with k = 1 every
        # base density is exactly 1 and only the float32 sum orders the tokens
        density.append(float(torch.tensor(base[i], dtype=torch.float32) + noise[i].float()))
    far = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i]]
        delta.append(min(denser) if denser else far)
    score = [delta[i] * density[i] for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (-score[i], i))
    centres = sorted(ranked[:clusters])
    margin = math.inf
    if clusters < n and score[ranked[clusters - 1]] != score[ranked[clusters]]:
        # (an exact tie comes from equal float32 densities and the same distance, e.g. two tokens
        # with delta = the largest distance: both sides break it towards the lower index)
        margin = (score[ranked[clusters - 1]] - score[ranked[clusters]]) / max(max(score), 1e-30)
    # a density order that float32 could flip matters where it sets a delta: j is i's nearest
    # denser token, or i would become j's
    for i in range(n):
        for j in range(n):
            if not (density[j] > density[i] and (dist[i][j] <= delta[i] or dist[i][j] < delta[j])):
                continue
            if base[i] != base[j]:
                margin = min(margin, abs(base[j] - base[i]))
            elif base[i] != 1.0:
                # equal densities (k = 2: mutual nearest neighbours), ordered by the noise after a
                # float32 sum whose rounding depends on the float32 base: safe if the noises are
                # two float32 steps apart (with k = 1 the base is exactly 1 on both sides)
                step = math.ulp(base[i]) * 2 ** 29  # float32's spacing there (52 - 23 bits)
                if abs(float(noise[i]) - float(noise[j])) < 2 * step:
                    margin = 0.0
    members = {c: [] for c in centres}
    for i in range(n):
        if i in members:
            continue
        best, best_d, second_d = None, math.inf, math.inf
        for c in centres:
            if dist[i][c] < best_d:
                best, best_d, second_d = c, dist[i][c], best_d
            elif dist[i][c] < second_d:
                second_d = dist[i][c]
        members[best].append(i)
        if second_d < math.inf:
            margin = min(margin, (second_d - best_d) / max(far, 1e-30))
    values = []
    for c in centres:
        if members[c]:
            mean = sum(tokens[i] for i in members[c]) / len(members[c])
            values.append(beta * tokens[c] + (1 - beta) * mean)
        else:
            values.append(tokens[c].clone())
    return Clustered(centres, values, margin)


@dataclass
class ReferenceVisual:
    tokens: torch.Tensor  # (M, D) float64
    slots: list[int]  # frame * N + position of each token's place
    windows: list[tuple[int, int]]
    retain: float
    margin: float


def reference_windows(sim: list[list[float]], frames: int, tau: float) -> tuple[list[tuple[int, int]], int]:
    """S(s, e) by a triple loop, then the official `select_static_windows` DP loop verbatim."""
    positions = len(sim[0]) if sim else 0
    gain = [[0] * frames for _ in range(frames)]
    for s in range(frames):
        for e in range(s + 1, frames):
            static = sum(all(sim[t][p] > tau for t in range(s, e)) for p in range(positions))
            gain[s][e] = static * (e - s)
    dp, prev = [0] * frames, [0] * frames
    for i in range(frames):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, i + 2):
            j = i - window_size
            current = (dp[j] if j >= 0 else 0) + gain[j + 1][i]
            if current > max_val:
                max_val, best_j = current, j + 1
        dp[i], prev[i] = max_val, best_j
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1]


def reference_visual(features: torch.Tensor, scores: torch.Tensor, retention: float, tau: float = 0.8,
                     beta: float = 0.6, dominant_share: float = 1.0, knn: int = 7,
                     generator: torch.Generator | None = None) -> ReferenceVisual:
    x, a = features.double(), scores.double()
    frames, n, _ = x.shape
    noise = Noise(generator)
    sim = [[cosine(x[t, p], x[t + 1, p]) for p in range(n)] for t in range(frames - 1)]
    margin = min((abs(v - tau) for row in sim for v in row), default=math.inf)
    windows, reduced = reference_windows(sim, frames, tau)
    total = frames * n
    retain = min(retention / ((total - reduced) / total), 1)
    out = [dict() for _ in range(frames)]  # per frame: position -> token
    for s, e in windows:
        length = e - s + 1
        static = [p for p in range(n) if length > 1 and all(sim[t][p] > tau for t in range(s, e))]
        dynamic = [p for p in range(n) if p not in static]
        budget = math.ceil(len(dynamic) * retain)
        d = round(budget * dominant_share)
        c = budget - d
        draws = noise.draw(length, len(dynamic) - d) if c > 0 else None
        for li, f in enumerate(range(s, e + 1)):
            ranked = sorted(dynamic, key=lambda p: (-float(a[f, p]), p))
            for p in ranked[:d]:
                out[f][p] = x[f, p].clone()
            if c > 0:
                rest = sorted(ranked[d:])
                got = dpc_merge([x[f, p] for p in rest], c, knn, beta, draws[li])
                margin = min(margin, got.margin)
                for centre, value in zip(got.centres, got.values):
                    out[f][rest[centre]] = value
        if static:
            clusters = round(len(static) * retain)
            if clusters > 0:
                means = [sum(x[t, p] for t in range(s, e + 1)) / length for p in static]
                got = dpc_merge(means, clusters, knn, beta, noise.draw(1, len(static))[0])
                margin = min(margin, got.margin)
                for centre, value in zip(got.centres, got.values):
                    out[s][static[centre]] = value
    tokens, slots = [], []
    for f in range(frames):
        for p in sorted(out[f]):
            tokens.append(out[f][p])
            slots.append(f * n + p)
    stacked = torch.stack(tokens) if tokens else torch.zeros(0, x.shape[-1], dtype=torch.float64)
    return ReferenceVisual(stacked, slots, windows, retain, margin)


@dataclass
class ReferenceMerge:
    kept: list[int]  # kept video indices, ascending
    states: torch.Tensor  # (k, D) float64 merged states of the kept tokens
    margin: float


def reference_inner_merge(hidden: torch.Tensor, scores: torch.Tensor, keep: float) -> ReferenceMerge:
    """The official inner merge on the (V, D) states entering layer K with the last token's (V,)
    attention at layer K-1: keep max(1, round(V·keep)) by attention (ties: lower index); cosine
    similarities once on the unmerged states; then, over the dropped tokens in position order,
    h[j*] = (h[j*] + h[i]) / 2 with j* the most similar kept token (ties: the lower position)."""
    video = hidden.shape[0]
    count = max(1, round(keep * video))
    ranked = sorted(range(video), key=lambda i: (-float(scores[i]), i))
    kept = sorted(ranked[:count])
    margin = float(scores[ranked[count - 1]] - scores[ranked[count]]) if count < video else math.inf
    h = hidden.double().clone()
    original = h.clone()
    targets = {}
    for i in range(video):
        if i in kept:
            continue
        sims = [cosine(original[i], original[j]) for j in kept]
        best = max(range(len(kept)), key=lambda t: (sims[t], -t))
        others = [v for t, v in enumerate(sims) if t != best]
        if others:
            margin = min(margin, sims[best] - max(others))
        targets[i] = kept[best]
    for i in sorted(targets):
        j = targets[i]
        h[j] = (h[j] + original[i]) / 2
    return ReferenceMerge(kept, h[kept], margin)
