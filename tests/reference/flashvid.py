"""A deliberately literal, slow restatement of FlashVID's visual stage (Fan et al., ICLR 2026), in
float64, written from the official code (Fanziyang-v/FlashVID at commit 1d37422,
`flashvid/utils.py::{flashvid_compression, segment, additional_segment, segment_compression,
spatiotemporal_compression, dpc_knn}`, `flashvid/token_selection.py::{attn_div_v2_based_token_selection,
attn_div_based_token_selection}`).

For tests, the golden file and the benchmark only; it does not import methods/flashvid.py. Dense
products (cosines, distances, dot products) are float64 tensor ops, as in the official code; every
decision (cuts, ADTS picks, parents, merges, the threshold, the tree sums, densities, nearest denser
token, centres, assignment) is a Python loop over plain numbers. It follows the choices the
implementation documents: extra cuts among the uncut transitions (earlier first), B capped at N,
an exact zero diagonal of the ADTS distance, no temporal merge at tau >= 1, ties to the lower index
(ADTS first at an equal output index), and the DPC-kNN noise drawn per clustered frame as
torch.rand((1, n), float32) * 1e-6 from one CPU generator, in frame order.

`margin` is the smallest gap at any decision (relative where the values are scores); exact ties are
not counted (both implementations break them by index), so a test can skip inputs whose decisions
float32 round-off could flip.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass
class Result:
    tokens: torch.Tensor  # (M, D) float64, sorted by index
    positions: list[int]  # f*N + n of each token
    segments: list[tuple[int, int]]  # [start, end)
    budget: tuple[int, int, int]  # (B, A, S)
    selected: list[list[int]]  # ADTS picks per frame, ascending
    roots: list[int]  # roots per frame (0 where no TSTM runs)
    margin: float


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _argmax(values: list[float], margins: list, relative: bool = True) -> int:
    """The first maximum; records its gap to the nearest other value (exact ties excluded)."""
    best = max(range(len(values)), key=lambda j: (values[j], -j))
    gaps = [(_rel if relative else lambda a, b: abs(a - b))(values[best], v)
            for j, v in enumerate(values) if j != best and v != values[best]]
    if gaps:
        margins.append(min(gaps))
    return best


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def reference_segments(means: torch.Tensor, threshold: float, min_segments: int, margins: list):
    frames = means.shape[0]
    sims = [_cos(means[t], means[t + 1]) for t in range(frames - 1)]
    cuts = {t for t, s in enumerate(sims) if s < threshold}
    margins += [abs(s - threshold) for s in sims]
    missing = min(min_segments - 1, frames - 1) - len(cuts)
    if missing > 0:
        uncut = sorted((t for t in range(frames - 1) if t not in cuts), key=lambda t: (sims[t], t))
        cuts |= set(uncut[:missing])
        if missing < len(uncut):
            margins.append(abs(sims[uncut[missing]] - sims[uncut[missing - 1]]) or math.inf)
    bounds, start = [], 0
    for t in range(frames):
        if t in cuts or t == frames - 1:
            bounds.append((start, t + 1))
            start = t + 1
    return bounds


def reference_adts(x: torch.Tensor, frames: list[int], scores, count: int, selection: str, margins: list):
    """Per frame of one segment: the official greedy, as loops over the calibrated distances."""
    n = x.shape[1]
    pooled = [x[c].mean(0) for c in frames]  # official pooled_features: one mean per frame of G
    picks_of = {}
    for f in frames:
        unit = x[f] / x[f].norm(dim=-1, keepdim=True)
        dist = (1.0 - unit @ unit.T).tolist()
        a = [float(v) * 1e6 for v in scores[f]]
        e = [sum(float(x[f, j] @ p) for p in pooled) / len(pooled) for j in range(n)]
        dm = [[0.0 if i == j else dist[i][j] * a[j] * (e[j] if selection == "attn_div_v2" else 1.0)
               for j in range(n)] for i in range(n)]
        second = [sorted(dm[i][j] for i in range(n))[min(1, n - 1)] for j in range(n)]
        picks = [_argmax(second, margins)]
        for _ in range(1, count):
            best = [min(dm[s][j] for s in picks) for j in range(n)]
            if selection == "attn_div":
                for s in picks:
                    best[s] = -1.0
            picks.append(_argmax(best, margins))
        picks_of[f] = sorted(picks)
    return picks_of


def reference_tstm(x: torch.Tensor, frames: list[int], selected: dict, threshold: float, budget: int,
                   margins: list):
    """One segment of >= 2 frames: (roots per frame [(index, value)], merged count)."""
    n = x.shape[1]
    g = len(frames)
    unit = x / x.norm(dim=-1, keepdim=True)
    m = {frames[0]: [-1.0] * n}
    parent = {frames[0]: [-1] * n}
    for prev, f in itertools.pairwise(frames):
        sims = (unit[f] @ unit[prev].T).tolist()
        m[f], parent[f] = [], []
        for i in range(n):
            row = [-1.0 if (i in selected[f] or k in selected[prev]) else sims[i][k] for k in range(n)]
            best = max(range(n), key=lambda k: (row[k], -k))
            m[f].append(row[best])
            parent[f].append(best)
            if row[best] > threshold:  # its parent matters
                gaps = [abs(row[best] - v) for k, v in enumerate(row) if k != best and v != row[best]]
                margins.append(min(gaps) if gaps else math.inf)
    values = [v for f in frames for v in m[f]]
    if threshold >= 1.0:
        cut = math.inf
    else:
        cut = threshold
        if g * n - sum(v > threshold for v in values) < budget * g:  # fewer than B*|G| unmerged
            k = g * n - budget * g
            cut = max(sorted(values, reverse=True)[k - 1], -1.0 + 1e-6) if k > 0 else math.inf
    margins += [abs(v - cut) for v in values if v != cut and v > -1.0 and math.isfinite(cut)]
    merged = {f: [m[f][i] > cut for i in range(n)] for f in frames}

    # the official backward pass: roots divided by their counts, merged tokens added to parents
    feats = {f: [x[f, i].clone() for i in range(n)] for f in frames}
    counts = {f: [1] * n for f in frames}
    for idx in range(g - 1, -1, -1):
        f = frames[idx]
        for i in range(n):
            if not merged[f][i]:
                feats[f][i] = feats[f][i] / counts[f][i]
                counts[f][i] = 1
        for i in range(n):
            if merged[f][i]:
                prev = frames[idx - 1]
                feats[prev][parent[f][i]] = feats[prev][parent[f][i]] + feats[f][i]
                counts[prev][parent[f][i]] += 1
    roots = {f: [(i, feats[f][i]) for i in range(n) if not merged[f][i] and i not in selected[f]]
             for f in frames}
    return roots


def reference_dpc(tokens: list, clusters: int, k: int, noise, margins: list):
    """DPC-kNN as the official dpc_knn: ([(centre position in tokens, mean)])."""
    x = torch.stack(tokens)
    n, dim = x.shape
    dist = (torch.cdist(x, x) / math.sqrt(dim)).tolist()
    for i in range(n):
        dist[i][i] = 0.0
    density = []
    for i in range(n):
        nearest = sorted(dist[i])[:k]
        density.append(math.exp(-sum(d * d for d in nearest) / k) + float(noise[i]))
    far = max(max(row) for row in dist)
    score = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i]]
        delta = min(denser) if denser else far
        score.append(delta * density[i])
        margins += [_rel(density[i], density[j]) for j in range(n)
                    if j != i and dist[i][j] <= delta and density[i] != density[j]]
    order = sorted(range(n), key=lambda i: (-score[i], i))
    centres = order[:clusters]
    if clusters < n and score[order[clusters - 1]] != score[order[clusters]]:
        margins.append(_rel(score[order[clusters - 1]], score[order[clusters]]))
    members = {c: [] for c in range(clusters)}
    for i in range(n):
        if i in centres:
            members[centres.index(i)].append(i)
            continue
        to = [dist[i][c] for c in centres]
        best = min(range(clusters), key=lambda c: (to[c], c))
        gaps = [abs(to[best] - v) for c, v in enumerate(to) if c != best and v != to[best]]
        if gaps:
            margins.append(min(gaps))
        members[best].append(i)
    out = []
    for c, centre in enumerate(centres):
        total = torch.zeros(dim, dtype=torch.float64)
        for i in members[c]:
            total = total + tokens[i]
        out.append((centre, total / len(members[c])))
    return out


def reference_flashvid(features, scores, retention=0.25, expansion=1.25, alpha=0.7, temporal_threshold=0.8,
                       segment_threshold=0.9, min_segments=8, selection="attn_div_v2",
                       noise_seed: int | None = None) -> Result:
    """scores: (F, N) on the feature grid. noise_seed: the DPC noise as the implementation documents
    it (None: no noise)."""
    x = features.double()
    frames, n, dim = x.shape
    margins = [math.inf]
    generator = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None

    bounds = reference_segments(x.mean(1), segment_threshold, min_segments, margins)
    budget = min(n, math.ceil(n * retention * expansion))
    count = math.ceil(budget * alpha)
    rest = budget - count

    out = []  # (index, kind, token): kind 0 for ADTS, 1 for clusters and roots
    selected_all, roots_all = [[] for _ in range(frames)], [0] * frames
    for s, e in bounds:
        frames_g = list(range(s, e))
        selected = {f: [] for f in frames_g}
        if count > 0:
            selected = reference_adts(x, frames_g, scores, count, selection, margins)
        for f in frames_g:
            selected_all[f] = selected[f]
            out += [(f * n + i, 0, x[f, i]) for i in selected[f]]
        if rest == 0:
            continue
        if len(frames_g) > 1:
            roots = reference_tstm(x, frames_g, {f: set(v) for f, v in selected.items()},
                                   temporal_threshold, budget, margins)
        else:  # the official single-frame branch: the whole frame
            roots = {s: [(i, x[s, i]) for i in range(n)]}
        total = sum(len(r) for r in roots.values())
        gamma = rest * len(frames_g) / total
        for f in frames_g:
            roots_all[f] = len(roots[f])
            clusters = math.ceil(len(roots[f]) * gamma)
            if clusters > 0 and gamma < 1.0:
                noise = [0.0] * len(roots[f])
                if generator is not None:
                    noise = (torch.rand((1, len(roots[f])), generator=generator, dtype=torch.float32)
                             * 1e-6)[0].tolist()
                for centre, mean in reference_dpc([v for _, v in roots[f]], clusters, min(clusters, 7),
                                                  noise, margins):
                    out.append((f * n + roots[f][centre][0], 1, mean))
            else:
                out += [(f * n + i, 1, v) for i, v in roots[f]]
    out.sort(key=lambda item: (item[0], item[1]))
    tokens = torch.stack([t for _, _, t in out]) if out else torch.zeros(0, dim, dtype=torch.float64)
    return Result(tokens, [i for i, _, _ in out], bounds, (budget, count, rest), selected_all, roots_all,
                  min(margins))
