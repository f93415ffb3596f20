"""A deliberately literal PruneVid (float64, Python loops), written from the official code.

Visual-AI/PruneVid `models/pllava/modeling_pllava.py` (`merge_frames_dynamic`, `cluster_dpc_knn`,
`refine_clusters`, `segment_lengths`, `compute_cluster_vectors`) and `VTPWindowCache.process_attention`
(`models/pllava/elastic_cache.py`), step by step, plus the harness's documented choices
(methods/prunevid.py docstring): the seeded 1e-6 density noise drawn in the documented order and added
in float32 as the method does, stable lower-index ties, at least one segment cluster, the mean
pairwise cosine capped at 1, tokens placed at their (centre's) original position. It does not import
methods/prunevid.py.

`reference_prunevid` returns the tokens in the OFFICIAL order (each segment: its static tokens, then
each frame's dynamic tokens, clusters in score order) with the sizes the official LLM stage reads, and
the position each token takes in the harness; `in_position_order` gives the harness's order.
`margin` is the smallest relative distance of any decision from flipping (a score at the top-k
boundary, a nearest-centre choice, a density order that changes a delta, a static test), so tests can
use inputs that float32 round-off cannot flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NOISE = 1e-6
KNN = 7
DENSITY_CLOSE = 1e-5  # density pairs closer than this are checked for a decision that their order flips


def draw_noise(generator: torch.Generator | None, shape) -> torch.Tensor:
    if generator is None:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.rand(shape, generator=generator, dtype=torch.float32) * NOISE


@dataclass
class Clustering:
    labels: list[int]  # cluster rank of every token
    centres: list[int]  # token index of each cluster's centre, in score order
    margin: float


def rel_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def reference_dpc(x: torch.Tensor, cluster_num: int, k: int, noise: torch.Tensor) -> Clustering:
    """`cluster_dpc_knn` for one set x (n, C) in float64 loops; noise (n,) float32."""
    x = x.double()
    n, channels = x.shape
    d = []
    for i in range(n):
        row = ((x - x[i]) ** 2).sum(-1).sqrt() / math.sqrt(channels)
        d.append([float(v) for v in row])
        d[i][i] = 0.0
    kk = min(k, n)
    rho = []
    for i in range(n):
        nearest = sorted(d[i])[:kk]
        exact = math.exp(-sum(v * v for v in nearest) / kk)
        # the method adds the noise to a float32 density, in float32
        rho.append(float(torch.tensor(exact, dtype=torch.float32) + noise[i]))
    far = max(max(row) for row in d)

    def delta_of(i, order):
        return min([d[i][j] for j in range(n) if order(j, i)], default=far)

    denser = lambda j, i: rho[j] > rho[i]  # noqa: E731
    delta = [delta_of(i, denser) for i in range(n)]
    score = [rho[i] * delta[i] for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (-score[i], i))
    centres = ranked[:cluster_num]

    labels = []
    margin = math.inf
    for t in range(n):
        best, best_d = 0, d[t][centres[0]] if centres else math.inf
        for r in range(1, len(centres)):
            if d[t][centres[r]] < best_d:
                best, best_d = r, d[t][centres[r]]
        labels.append(best)
        if t not in centres and len(centres) > 1:
            others = sorted(d[t][c] for c in centres)
            margin = min(margin, rel_gap(others[0], others[1]))
    for r, c in enumerate(centres):
        labels[c] = r

    if 0 < cluster_num < n:
        margin = min(margin, rel_gap(score[ranked[cluster_num - 1]], score[ranked[cluster_num]]))
    if cluster_num > 0:  # close densities whose order decides a delta
        for i in range(n):
            for j in range(i + 1, n):
                if rho[i] != rho[j] and abs(rho[i] - rho[j]) < DENSITY_CLOSE:
                    low, high = (i, j) if rho[i] < rho[j] else (j, i)
                    flipped_low = min([d[low][m] for m in range(n) if rho[m] > rho[low] and m != high],
                                      default=far)
                    flipped_high = min(delta[high], d[high][low])
                    if flipped_low != delta[low] or flipped_high != delta[high]:
                        margin = min(margin, abs(rho[i] - rho[j]))
    return Clustering(labels, centres, margin)


def cluster_means(x: torch.Tensor, labels: list[int], count: int) -> list[torch.Tensor]:
    """`compute_cluster_vectors`: the plain mean of each cluster's members (float64)."""
    out = []
    for c in range(count):
        members = [x[i].double() for i in range(len(labels)) if labels[i] == c]
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for m in members:
            total = total + m
        out.append(total / max(len(members), 1))
    return out


def refine_clusters(cluster_idx: list[int]) -> list[int]:
    """The official `refine_clusters`, one video, step by step."""
    n = len(cluster_idx)
    refined = list(cluster_idx)
    segment_info = {}
    for label in sorted(set(cluster_idx)):  # torch.unique order
        indices = [i for i in range(n) if cluster_idx[i] == label]
        segments = []
        start = prev = indices[0]
        for idx in indices[1:]:
            if idx == prev + 1:
                prev = idx
            else:
                segments.append((start, prev))
                start = prev = idx
        segments.append((start, prev))
        segment_info[label] = segments
    for label, segments in segment_info.items():
        max_length = max(end - start + 1 for start, end in segments)
        if max_length == 1:
            for start, end in segments:
                for i in range(start, end + 1):
                    refined[i] = -1
            continue
        for start, end in segments:
            if end - start + 1 != max_length:
                for i in range(start, end + 1):
                    refined[i] = -1
    idx = 0
    while idx < n:
        if refined[idx] == -1:
            start = idx
            while idx < n and refined[idx] == -1:
                idx += 1
            end = idx - 1
            left_label, left_length = None, 0
            if start > 0:
                left_label = refined[start - 1]
                l_idx = start - 1
                while l_idx >= 0 and refined[l_idx] == left_label:
                    l_idx -= 1
                left_length = start - l_idx - 1
            right_label, right_length = None, 0
            if end < n - 1:
                right_label = refined[end + 1]
                r_idx = end + 1
                while r_idx < n and refined[r_idx] == right_label:
                    r_idx += 1
                right_length = r_idx - end - 1
            if left_length > right_length:
                new_label = left_label
            elif right_length > left_length:
                new_label = right_label
            else:
                new_label = left_label if left_label is not None else right_label
            if new_label is None:
                new_label = 0
            for i in range(start, end + 1):
                refined[i] = new_label
        else:
            idx += 1
    return refined


def segment_lengths(labels: list[int]) -> list[int]:
    lengths, run = [], 1
    for i in range(1, len(labels)):
        if labels[i] != labels[i - 1]:
            lengths.append(run)
            run = 1
        else:
            run += 1
    lengths.append(run)
    return lengths


@dataclass
class Reference:
    tokens: list[torch.Tensor]  # official order
    positions: list[int]  # the position each token takes (index into the flattened F*N input)
    groups: list[int]  # frame t's dynamic tokens: t; segment s's static tokens: F + s
    static_sizes: list[int]
    dynamic_sizes: list[int]
    window_sizes: list[int]
    dim: int = 0
    margin: float = math.inf
    frame_labels: list[int] = field(default_factory=list)

    def in_position_order(self):
        order = sorted(range(len(self.positions)), key=lambda j: self.positions[j])
        tokens = (torch.stack([self.tokens[j] for j in order]) if order
                  else torch.zeros(0, self.dim, dtype=torch.float64))
        return tokens, [self.positions[j] for j in order], [self.groups[j] for j in order], order


def reference_prunevid(features: torch.Tensor, segment_ratio: float = 0.25, tau: float = 0.8,
                       cluster_ratio: float = 0.5, generator: torch.Generator | None = None) -> Reference:
    """`merge_frames_dynamic` on (F, N, C) features, float64."""
    x = features.double()
    frames, n, channels = x.shape
    margin = math.inf

    # 1. frame clustering on the frame means, then contiguity
    means = torch.stack([sum(x[t, i] for i in range(n)) / n for t in range(frames)])
    cluster_num = min(frames, max(1, int(frames * segment_ratio)))
    frame_dpc = reference_dpc(means, cluster_num, KNN, draw_noise(generator, (1, frames))[0])
    margin = min(margin, frame_dpc.margin)
    windows = segment_lengths(refine_clusters(frame_dpc.labels))

    ref = Reference([], [], [], [], [], [], dim=channels, frame_labels=frame_dpc.labels)
    start = 0
    for s, size in enumerate(windows):
        w = size
        unit = [[x[start + a, l] / max(float(x[start + a, l].norm()), 1e-12) for l in range(n)]
                for a in range(w)]
        static = []
        for l in range(n):
            if w == 1:
                static.append(False)
                continue
            total = 0.0
            for a in range(w):
                for b in range(w):
                    total += float((unit[a][l] * unit[b][l]).sum())
            sim = min((total - w) / (w * (w - 1)), 1.0)
            margin = min(margin, abs(sim - tau))
            static.append(sim > tau)
        static_pos = [l for l in range(n) if static[l]]
        dynamic_pos = [l for l in range(n) if not static[l]]

        # static: temporal mean, clustered if more than 14
        static_feat = [sum(x[start + a, l] for a in range(w)) / w for l in static_pos]
        if len(static_feat) > 14:
            count = int(len(static_feat) * cluster_ratio)
            noise = draw_noise(generator, (1, len(static_feat)))[0]
            dpc = reference_dpc(torch.stack(static_feat), count, KNN, noise)
            margin = min(margin, dpc.margin)
            tokens = cluster_means(torch.stack(static_feat), dpc.labels, count) if count else []
            places = [static_pos[c] for c in dpc.centres]
        else:
            tokens, places = static_feat, static_pos
        ref.tokens += tokens
        ref.positions += [start * n + p for p in places]
        ref.groups += [frames + s] * len(tokens)
        ref.static_sizes.append(len(tokens))

        # dynamic: per frame, clustered if more than 14
        dynamic_total = 0
        noise = draw_noise(generator, (w, len(dynamic_pos))) if len(dynamic_pos) > 14 else None
        for a in range(w):
            feat = [x[start + a, l] for l in dynamic_pos]
            if len(feat) > 14:
                count = int(len(feat) * cluster_ratio)
                dpc = reference_dpc(torch.stack(feat), count, KNN, noise[a])
                margin = min(margin, dpc.margin)
                tokens = cluster_means(torch.stack(feat), dpc.labels, count) if count else []
                places = [dynamic_pos[c] for c in dpc.centres]
            else:
                tokens, places = feat, dynamic_pos
            ref.tokens += tokens
            ref.positions += [(start + a) * n + p for p in places]
            ref.groups += [start + a] * len(tokens)
            dynamic_total += len(tokens)
        ref.dynamic_sizes.append(dynamic_total)
        ref.window_sizes.append(w)
        start += w
    ref.margin = margin
    return ref


def reference_keep(scores: list[float], static_sizes: list[int], dynamic_sizes: list[int],
                   window_sizes: list[int], alpha: float) -> list[int]:
    """`VTPWindowCache.process_attention` on per-token scores in the official order (ties: lower
    index), sorted ascending as `prompt_prefill` does."""
    def topk(values: list[float], k: int) -> list[int]:
        return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]

    kept, start = [], 0
    for static_size, dynamic_size, window_size in zip(static_sizes, dynamic_sizes, window_sizes):
        end = start + static_size + dynamic_size
        window = scores[start:end]
        kept += [start + i for i in topk(window[:static_size], int(static_size * alpha))]
        per_frame = dynamic_size // window_size
        for j in range(window_size):
            frame = window[static_size + j * per_frame: static_size + (j + 1) * per_frame]
            kept += [start + static_size + j * per_frame + i for i in topk(frame, int(per_frame * alpha))]
        start = end
    return sorted(kept)
