"""A deliberately literal restatement of STTM's merge (Hyun et al., ICCV 2025; official HYUNJS/STTM at
00736c7: `quadtree_builder.py::quadtree_build_video`, `quadtree_spatial_merger.py::
{avgpool_to_even_side_feature, pool_to_even_side_index_video}`, `quadtree_temporal_merger.py::
{get_cross_frame_node_pairs_fast, filter_cross_frame_node_pairs, get_merge_dst_idx_safe,
agg_feature_and_metadata}`), in float64 with Python loops over nodes. For tests only; it never
imports methods/sttm.py.

- The pyramid: the official size loop and its four pooling cases (even, odd rows, odd columns, both
  odd: the top-left entry copied, first row / column pooled as stripes), written per output cell.
- The quadtree: a recursion from every root node; the child slots of the four cases written out,
  the slots a node does not have pointing at child (0, 0) (official quirk).
- Temporal: every pair of nodes of consecutive frames whose boxes nest, cosine of rows divided by
  norm + 1e-8, the official representative rounds with Python lists (each round: every node
  touched by a pair takes the smallest of its own representative and those of its pairs, then
  rep <- rep[rep], until rep is idempotent), plain means per representative.
`margin` is the smallest distance of any similarity that decided something to its threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RefMerge:
    keys: list[int]  # t*h*w + y0*w + x0 of each survivor, ascending
    states: torch.Tensor  # (M, C) float64
    boxes: list[tuple[int, int, int, int, int]]  # (t, y0, x0, y1, x1)
    margin: float


def sizes(h: int, w: int) -> list[tuple[int, int]]:
    out = [(h, w)]
    while h != 2 and w != 2:
        w = math.ceil(w / 2)
        h = math.ceil(h / 2)
        out.insert(0, (h, w))
    return out


def groups(n: int) -> list[list[int]]:
    """The child rows (or columns) of each parent along a side of n, as the official code pools them."""
    if n % 2 == 0:
        return [[2 * i, 2 * i + 1] for i in range(n // 2)]
    return [[0]] + [[1 + 2 * i, 2 + 2 * i] for i in range((n - 1) // 2)]


def pool(level: list) -> list:
    """level[t][y][x] -> the next coarser level (mean of each cell's rows x columns)."""
    h, w = len(level[0]), len(level[0][0])
    out = []
    for frame in level:
        out.append([[sum(frame[y][x] for y in ry for x in cx) / (len(ry) * len(cx)) for cx in groups(w)]
                    for ry in groups(h)])
    return out


def slots(h: int, w: int, i: int, j: int) -> tuple[list[tuple[int, int]], list[bool]]:
    """The 4 child slots (y, x) of parent (i, j) of an h x w level (official offsets [0,0], [0,1],
    [1,0], [1,1]) and whether each is valid; an invalid slot points at (0, 0)."""
    ry, cx = groups(h)[i], groups(w)[j]
    out, valid = [], []
    for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
        ok = a < len(ry) and b < len(cx)
        out.append((ry[a], cx[b]) if ok else (0, 0))
        valid.append(ok)
    return out, valid


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / max(float(a.norm() * b.norm()), 1e-8))


def reference_sttm(video: torch.Tensor, tau_s: float | None, tau_t: float | None, root_level: int = 1) -> RefMerge:
    """video (F, h, w, C)."""
    frames, h, w, _ = video.shape
    x = video.double()
    margin = math.inf
    leaf = [[[x[t, y, c] for c in range(w)] for y in range(h)] for t in range(frames)]
    nodes = []  # (key, box, state)
    if tau_s is None:
        for t in range(frames):
            for y in range(h):
                for c in range(w):
                    nodes.append((t * h * w + y * w + c, (t, y, c, y + 1, c + 1), leaf[t][y][c]))
    else:
        levels_total = sizes(h, w)
        n_levels = len(levels_total) - root_level
        feats = [leaf]
        for _ in range(n_levels - 1):
            feats.insert(0, pool(feats[0]))
        # boxes: a leaf (y, x) covers itself; a parent covers its first slot's top-left to its last
        # valid child's bottom-right
        boxes = [[[(y, c, y + 1, c + 1) for c in range(w)] for y in range(h)]]
        for level in range(n_levels - 2, -1, -1):
            below = boxes[0]
            hh, ww = len(below), len(below[0])
            ph, pw = math.ceil(hh / 2), math.ceil(ww / 2)
            here = []
            for i in range(ph):
                row = []
                for j in range(pw):
                    ry, cx = groups(hh)[i], groups(ww)[j]
                    row.append(below[ry[0]][cx[0]][:2] + below[ry[-1]][cx[-1]][2:])
                here.append(row)
            boxes.insert(0, here)

        def visit(level, t, i, j):
            nonlocal margin
            if level == n_levels - 1:
                nodes.append((None, (t, *boxes[level][i][j]), feats[level][t][i][j]))
                return
            hh, ww = len(feats[level + 1][0]), len(feats[level + 1][0][0])
            children, valid = slots(hh, ww, i, j)
            sims = [cosine(feats[level][t][i][j], feats[level + 1][t][cy][cx]) for cy, cx in children]
            margin = min(margin, abs(min(sims) - tau_s))
            if all(s >= tau_s for s in sims):
                nodes.append((None, (t, *boxes[level][i][j]), feats[level][t][i][j]))
                return
            for (cy, cx), ok in zip(children, valid):
                if ok:
                    visit(level + 1, t, cy, cx)

        for t in range(frames):
            for i in range(len(feats[0][0])):
                for j in range(len(feats[0][0][0])):
                    visit(0, t, i, j)
        nodes = [(b[0] * h * w + b[1] * w + b[2], b, s) for _, b, s in nodes]
    nodes.sort(key=lambda n: n[0])
    count = len(nodes)
    rep = list(range(count))
    if tau_t is not None:
        pairs = []
        by_frame = [[k for k in range(count) if nodes[k][1][0] == t] for t in range(frames)]
        for t in range(frames - 1):
            for a, b in ((a, b) for a in by_frame[t] for b in by_frame[t + 1]):
                ta, tb = nodes[a][1], nodes[b][1]
                a_holds_b = ta[1] <= tb[1] and ta[2] <= tb[2] and ta[3] >= tb[3] and ta[4] >= tb[4]
                b_holds_a = tb[1] <= ta[1] and tb[2] <= ta[2] and tb[3] >= ta[3] and tb[4] >= ta[4]
                if not (a_holds_b or b_holds_a):
                    continue
                ua = nodes[a][2] / (nodes[a][2].norm() + 1e-8)
                ub = nodes[b][2] / (nodes[b][2].norm() + 1e-8)
                sim = float(ua @ ub)
                margin = min(margin, abs(sim - tau_t))
                if sim >= tau_t:
                    pairs.append((a, b))
        rep = official_rounds(pairs, count)
    survivors = sorted(set(rep))
    states = torch.stack([sum(nodes[k][2] for k in range(count) if rep[k] == r) / rep.count(r)
                          for r in survivors])
    return RefMerge([nodes[r][0] for r in survivors], states, [nodes[r][1] for r in survivors], margin)


def official_rounds(pairs: list[tuple[int, int]], count: int) -> list[int]:
    """The official representative rounds (`get_merge_dst_idx_safe`): each round, every node of a
    pair takes the smallest of its representative and the pair's (read before the round), then
    rep <- rep[rep]; stop when rep is idempotent."""
    rep = list(range(count))
    while True:
        old = list(rep)
        for a, b in pairs:
            low = min(old[a], old[b])
            rep[a] = min(rep[a], low)
            rep[b] = min(rep[b], low)
        rep = [rep[r] for r in rep]
        if rep == [rep[r] for r in rep]:
            return rep


def connected_components(pairs: list[tuple[int, int]], count: int) -> list[int]:
    """A full union-find (for contrast with the official rounds): the smallest index of each node's
    component."""
    parent = list(range(count))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(count)]
