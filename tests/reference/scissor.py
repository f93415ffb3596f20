"""A deliberately literal, slow restatement of Scissor (LLaVA-Scissor: Sun et al., arXiv:2506.21862).

For tests and benchmarks only. It follows SCC steps 1-6 and the merge as methods/scissor.py states
them, step by step with Python loops over nodes and edges and a plain union-find, the way the paper's
reference code does (HumanMLLM/LLaVA-Scissor `approximate_components`: a numpy union-find over the
edges incident to the sample), but it collects *true* components (choice of this harness). The
dense products (normalising, similarity matrices, the merge similarities) are tensor ops, as in the
reference code; everything about the graph is plain Python.

It reports the smallest distance between a similarity and `tau`, and between the best and the
second-best merge similarity, so that a test can avoid inputs whose decisions would flip under
float32 round-off (the implementation under test works in float32, this one in float64 by
default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def reference_sample_size(n: int, epsilon: float) -> int:
    if n == 1:
        return 1
    return min(n, math.ceil(math.log(n) / (epsilon * epsilon)))


class UnionFind:
    """Plain union-find: parent pointers, `find` walks to the root and compresses the path."""

    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class SCCResult:
    components: list[list[int]]  # members (ascending) of each component, in step 5's order
    means: torch.Tensor  # (K, D) unweighted mean of each component's rows of V
    margin: float  # min |cos(i, j) - tau| over pairs i != j


def _unit(v: torch.Tensor) -> torch.Tensor:
    norms = v.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, v / torch.where(norms > 0, norms, 1), torch.zeros_like(v))


def reference_scc(v: torch.Tensor, tau: float, epsilon: float,
                  generator: torch.Generator | None = None) -> SCCResult:
    """SCC(V, tau, epsilon), steps 1-6, on (n, D) tokens in their own dtype."""
    n = v.shape[0]
    # Steps 1-2.
    u = _unit(v)
    sim = u @ u.T
    nonzero = v.norm(dim=1) > 0
    for i in range(n):
        sim[i, i] = 1.0 if nonzero[i] else 0.0
    off = sim.clone()
    off.fill_diagonal_(float("inf"))
    margin = float((off - tau).abs().min()) if n > 1 else float("inf")
    a = (sim > tau).cpu().numpy()
    a = a | a.T  # exact in exact arithmetic; removes one-ulp asymmetry of the product
    deg = [int(a[i].sum()) for i in range(n)]

    # Step 3: the sample (drawn only when s < n, like the implementation).
    s = reference_sample_size(n, epsilon)
    if s < n:
        sample = torch.randperm(n, generator=generator)[:s].tolist()
    else:
        sample = list(range(n))

    # Step 4: union over every edge incident to a sampled node.
    uf = UnionFind(n)
    for i in sample:
        for j in np.flatnonzero(a[i]):
            uf.union(i, int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)

    # Step 5: order by the member of largest degree (ties: smallest index).
    def key(members: list[int]) -> int:
        best = members[0]
        for i in members:
            if deg[i] > deg[best] or (deg[i] == deg[best] and i < best):
                best = i
        return best

    components = sorted(groups.values(), key=key)
    # Step 6.
    means = torch.stack([v[members].mean(dim=0) for members in components])
    return SCCResult(components, means, margin)


@dataclass
class ScissorResult:
    output: torch.Tensor  # (M, D)
    spatial: list[SCCResult]
    temporal: SCCResult
    assignment: list[int]  # representative index of each of the F*N tokens
    margin: float  # smallest threshold margin over all SCC calls
    gap: float  # smallest (best - second best) merge similarity over tokens; 0 for exact ties


def reference_scissor(x: torch.Tensor, tau: float, epsilon: float = 0.05,
                      generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float64) -> ScissorResult:
    """Scissor on (F, N, D) features, computed in `dtype`, literally as methods/scissor.py states it."""
    x = x.to(dtype)
    frames, per_frame, dim = x.shape
    spatial = [reference_scc(x[f], tau, epsilon, generator) for f in range(frames)]
    reps = torch.cat([r.means for r in spatial])
    temporal = reference_scc(reps, tau, epsilon, generator)
    t = temporal.means

    # Merge. torch.argmax returns the first maximum: ties go to the smallest j.
    tokens = x.reshape(frames * per_frame, dim)
    sims = _unit(tokens) @ _unit(t).T
    assignment = sims.argmax(dim=1).tolist()
    if sims.shape[1] > 1:
        top2 = sims.topk(2, dim=1).values
        gap = float((top2[:, 0] - top2[:, 1]).min())
    else:
        gap = float("inf")

    out = t.clone()
    counts = [0] * t.shape[0]
    for i, j in enumerate(assignment):
        out[j] += tokens[i]
        counts[j] += 1
    for j in range(t.shape[0]):
        out[j] /= 1 + counts[j]
    margin = min([r.margin for r in spatial] + [temporal.margin])
    return ScissorResult(out, spatial, temporal, assignment, margin, gap)


# ----------------------------------------------------------------------------------------------
# Reference-code style, for speed comparisons only.


class NumpyUnionFind:
    """Union-find as the paper's reference code writes it: numpy arrays, union by rank, path
    halving, one Python iteration per edge."""

    def __init__(self, size: int):
        self.parent = np.arange(size, dtype=np.int64)
        self.rank = np.zeros(size, dtype=np.int32)

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def batch_union(self, xs, ys):
        for x, y in zip(xs, ys, strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if self.rank[rx] < self.rank[ry]:
                self.parent[rx] = ry
            else:
                self.parent[ry] = rx
                if self.rank[rx] == self.rank[ry]:
                    self.rank[rx] += 1


def _reference_code_style_components(adj: np.ndarray, epsilon: float,
                                     generator: torch.Generator | None) -> list[list[int]]:
    """The reference code's `approximate_components`, step for step, except that a component
    is every node whose root is the component's root (the reference code keeps only the root's
    direct children; this harness treats that as an accident). The cost is the same: one numpy scan
    per root either way."""
    n = adj.shape[0]
    all_nodes = np.ones(n)
    all_indices = np.arange(0, n)
    s = reference_sample_size(n, epsilon)
    sampled = (torch.randperm(n, generator=generator)[:s] if s < n else torch.arange(n)).numpy()
    all_nodes[sampled] = 0
    neighbor_dict = {}
    for i in sampled:
        neighbors = np.nonzero(adj[i])[0]
        neighbor_dict[i] = np.intersect1d(neighbors, all_indices, assume_unique=True)
        all_nodes[neighbors] = 0
    xs, ys = [], []
    for i in sampled:
        for j in neighbor_dict[i]:
            xs.append(i)
            ys.append(j)
    uf = NumpyUnionFind(n)
    uf.batch_union(np.array(xs, dtype=np.int64), np.array(ys, dtype=np.int64))
    sampled_roots = np.array([uf.find(i) for i in sampled])
    roots = np.array([uf.find(i) for i in range(n)])  # true components
    components = []
    for root in np.unique(sampled_roots):
        _ = sampled_roots == root  # computed (and unused) by the reference code
        components.append(np.where(roots == root)[0].tolist())
    components.extend([int(i)] for i in np.nonzero(all_nodes)[0])
    degrees = np.count_nonzero(adj, axis=1)

    def key(cluster):
        max_degree, min_node = -1, float("inf")
        for node in cluster:
            if degrees[node] > max_degree or (degrees[node] == max_degree and node < min_node):
                max_degree, min_node = degrees[node], node
        return min_node

    components.sort(key=key)
    return components


def reference_code_style_scissor(x: torch.Tensor, tau: float, epsilon: float = 0.05,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Scissor structured like the paper's reference code (float32 products, adjacency moved to
    numpy, numpy union-find over edges, per-component torch means, argmax + scatter_add merge)
    but with true components and exact self-similarity, so its output matches `reference_scissor`."""

    def adjacency(units):
        sim = units @ units.mT
        sim.diagonal(dim1=-2, dim2=-1).copy_(sim.diagonal(dim1=-2, dim2=-1) > 0)
        adj = (sim > tau).cpu().numpy()
        return adj | np.swapaxes(adj, -1, -2)

    x = x.float()
    frames, per_frame, dim = x.shape
    adj = adjacency(_unit(x.reshape(-1, dim)).reshape(frames, per_frame, dim))
    reps = []
    for f in range(frames):
        for members in _reference_code_style_components(adj[f], epsilon, generator):
            reps.append(x[f][members].mean(dim=0))
    reps = torch.stack(reps)
    merged = torch.stack([reps[members].mean(dim=0) for members in
                          _reference_code_style_components(adjacency(_unit(reps)), epsilon,
                                                           generator)])
    tokens = x.reshape(-1, dim)
    closest = torch.argmax(_unit(tokens) @ _unit(merged).T, dim=1)
    out = merged.clone()
    out.scatter_add_(0, closest.view(-1, 1).expand(-1, dim), tokens)
    out /= (torch.bincount(closest, minlength=merged.shape[0]).float() + 1).unsqueeze(1)
    return out
