"""Scissor (LLaVA-Scissor): token compression with semantic connected components, vectorised.

Paper: Sun et al., "LLaVA-Scissor: Token Compression with Semantic Connected Components for Video
LLMs", arXiv:2506.21862 (2025). Official code followed: HumanMLLM/LLaVA-Scissor, read at commit
b63354c, `llava/model/llava_arch_zip.py` (`approximate_components` with `UnionFind`, and the
`mm_patch_merge_type == "flat"` branch of `LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`:
spatial SCC per frame, temporal SCC over the spatial means, merge; defaults tau 0.95, epsilon 0.05).

SCC(V, tau, epsilon), the steps the docstrings below number: 1. unit rows and their cosine
similarities; 2. the adjacency A = (cos > tau); 3. a sample of s = min(n, ceil(ln(n) / epsilon^2))
nodes; 4. the union of every edge incident to a sampled node; 5. the components, ordered by the
index of their member of largest degree (ties: the smaller index); 6. each component's unweighted
mean. Scissor: SCC of each frame's tokens (spatial), SCC of all the spatial means (temporal), then
every token joins its most similar temporal representative, which becomes the mean of itself and
its members.

Pure tensor code on the device of its input: no Python loop over
tokens or edges. The official code finds components with a Python union-find over the edges;
here they come from min-label propagation on the dense boolean adjacency, a few full passes
over an (n, n) byte matrix, which costs little next to the similarity products themselves.

Graph decisions (normalisation, similarities, thresholds, argmax) and means are computed in
float32 for float32/bfloat16/float16 input (in float64 for float64 input); the output has the
input's dtype.

Choices of this harness, in this module and in tests/reference/scissor.py:
- components are true connected components: every node whose union-find root is the component's
  root (the official code collects only the root's direct children, `uf.parent == root`).
- cos(i, i) is its exact value, 1 (0 for a zero token), not the rounded product, so A[i, i] is
  (1 > tau), as in exact arithmetic; zero tokens have cosine 0 to everything, so for tau < 0
  they join every token, as the definition of A says.
- an edge is A[i, j] or A[j, i]: the rounded product U @ U.T may be asymmetric by one ulp.
- the sample S of an SCC call is the first s entries of torch.randperm(n, generator), drawn
  only when s < n: one draw per frame in frame order, then one for the temporal call (official:
  `np.random.choice(n, s, replace=False)`, from numpy's global state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import (
    Compressor,
    RetentionKnob,
    VisualInput,
    cosine_threshold,
    knob,
)
from methods.core.similarity import checked_features, unit_rows

__all__ = ["sample_size", "scissor_compress", "semantic_connected_components"]


def sample_size(n: int, epsilon: float) -> int:
    """`s = min(n, ceil(ln(n) / epsilon^2))`, with s = 1 for n = 1 (SCC step 3)."""
    if n <= 1:
        return n
    return min(n, math.ceil(math.log(n) / (epsilon * epsilon)))


@torch.no_grad()
def scissor_compress(features: torch.Tensor, tau: float, epsilon: float = 0.05,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Compress (F, N, D) video tokens to (M, D): spatial SCC per frame, temporal SCC, merge.

    `generator` is drawn from only in the sampled regime (an SCC call with s < n), once per such
    call; None means torch's default CPU generator. The same seed gives the same output.
    """
    Scissor.check_knobs(tau=tau, epsilon=epsilon)
    x = checked_features(features)
    frames, per_frame, dim = x.shape
    flat = x.reshape(frames * per_frame, dim)

    # 1. Spatial: one batched SCC over all frames; component ids run in frame order.
    units = unit_rows(x)
    comp, k = _scc(units, tau, epsilon, generator)
    reps = _segment_mean(flat, comp, k)

    # 2. Temporal: SCC over the spatial representatives, each counted once.
    comp_t, m = _scc(unit_rows(reps)[None], tau, epsilon, generator)
    merged = _segment_mean(reps, comp_t, m)

    # 3. Merge: every original token joins its most similar representative (ties: smallest j;
    # argmax returns the first maximum).
    sims = units.reshape(frames * per_frame, dim) @ unit_rows(merged).T
    assign = sims.argmax(dim=1)
    del sims
    counts = torch.bincount(assign, minlength=m).to(merged.dtype)
    out = merged.index_add_(0, assign, flat)
    out /= (counts + 1).unsqueeze(1)
    return out.to(features.dtype)


@torch.no_grad()
def semantic_connected_components(tokens: torch.Tensor, tau: float, epsilon: float = 0.05,
                                  generator: torch.Generator | None = None
                                  ) -> tuple[torch.Tensor, int]:
    """`SCC(V, tau, epsilon)` (steps 1-5, see the module docstring) on (n, D) tokens, without the means.

    Returns (labels, count): labels is a LongTensor (n,) giving each token's component index in
    the component order of step 5, count the number of components.
    """
    Scissor.check_knobs(tau=tau, epsilon=epsilon)
    x = checked_features(tokens, "tokens", "(n, D)")
    return _scc(unit_rows(x)[None], tau, epsilon, generator)


# ----------------------------------------------------------------------------------------------
# SCC


def _segment_mean(x: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """Unweighted mean of the rows of `x` in each of `count` groups given by `index`."""
    sums = torch.zeros(count, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, index, x)
    sizes = torch.bincount(index, minlength=count).to(x.dtype)
    return sums.div_(sizes.unsqueeze(1))


def _scc(units: torch.Tensor, tau: float, epsilon: float,
         generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """Components of B independent graphs, one per batch row of `units` (B, n, D).

    Returns (comp, count): comp (B*n,) is each node's component index, components numbered
    batch by batch and, within a batch, in step 5's order; count is their total.
    """
    batch, n, _ = units.shape
    device = units.device
    step = _row_step(batch, n, device)

    # Steps 1-2: adjacency. The self-similarity is set to its exact value, 1 (0 for a zero
    # token, whose unit row is zero), so that round-off cannot flip A[i, i] when tau is near 1.
    sims = torch.matmul(units, units.mT)
    diag = sims.diagonal(dim1=-2, dim2=-1)
    diag.copy_(diag > 0)
    adj = sims > tau
    del sims, diag
    bytes_ = adj.view(torch.uint8)
    deg = torch.empty(batch, n, dtype=_label_dtype(n), device=device)
    for i in range(0, n, step):
        torch.sum(bytes_[:, i:i + step], dim=-1, dtype=deg.dtype, out=deg[:, i:i + step])

    # Steps 3-4: keep the edges incident to the sample S (none dropped when s = n).
    s = sample_size(n, epsilon)
    if s < n:
        in_sample = torch.zeros(batch, n, dtype=torch.bool, device=device)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        for b in range(batch):  # one draw per SCC call, in frame order
            pick = torch.randperm(n, generator=generator, device=gen_device)[:s]
            in_sample[b, pick.to(device)] = True
        for i in range(0, n, step):
            adj[:, i:i + step] &= in_sample[:, i:i + step, None] | in_sample[:, None, :]
    # Self-loops change no component and give every row a true entry.
    adj.diagonal(dim1=-2, dim2=-1).fill_(True)
    labels = _min_label_components(adj, step)
    del adj, bytes_

    # Step 5: a component's key is its member with the largest degree, ties to the smallest
    # index. Mark each key member as its component's "head": heads in node order are the
    # components in key order, so a running count numbers them.
    idx = torch.arange(n, device=device)
    score = deg.long() * n + (n - 1 - idx)  # larger degree first, then smaller index
    best = torch.full((batch, n), -1, dtype=torch.long, device=device)
    best.scatter_reduce_(1, labels, score, reduce="amax")
    head = (n - 1 - best.remainder(n)).gather(1, labels)  # (B, n): the key of each node's component
    number = (head == idx).flatten().cumsum(0) - 1
    count = int(number[-1]) + 1
    offsets = torch.arange(batch, device=device).unsqueeze(1) * n
    return number[(head + offsets).flatten()], count


def _label_dtype(n: int) -> torch.dtype:
    """The smallest integer type holding 0..n: passes over the adjacency are memory-bound."""
    return torch.int16 if n < 2**15 else torch.int32


def _row_step(batch: int, n: int, device: torch.device) -> int:
    """Rows per block for passes over a (batch, n, n) adjacency.

    On CPU, blocks of about 2**20 entries keep each block's temporaries in cache; on other
    devices one block does.
    """
    if device.type != "cpu":
        return n
    return max(1, min(n, 2**20 // (batch * n)))


def _min_label_components(adj: torch.Tensor, step: int) -> torch.Tensor:
    """Connected components of B graphs given as (B, n, n) bool with a true diagonal.

    The graph is A or A.T: `adj` need not be exactly symmetric (a similarity product can be off
    by one ulp across the diagonal), each edge counts in both directions.

    Returns labels (B, n): the smallest node index of each node's component. Labels form a forest
    whose pointers go to smaller indices. Each round finds, for every node, the smallest label
    among its neighbours (a masked max of n - label over its row and its column, in row blocks),
    hooks each tree root to the smallest label seen by any of its members and flattens the trees
    by pointer jumping. A tree touching a smaller-labelled one hooks at once, and one that only
    touches larger-labelled ones is hooked onto or, one round later, sees a smaller label: every
    tree merges within two rounds, so there are O(log n) rounds, typically two or three. It
    stops when every node's neighbours carry its own label (one host sync per round).
    """
    batch, n, _ = adj.shape
    device = adj.device
    dtype = _label_dtype(n)
    bytes_ = adj.view(torch.uint8)
    block = torch.empty(batch, min(step, n), n, dtype=dtype, device=device)
    row_best = torch.empty(batch, n, dtype=dtype, device=device)
    col_best = torch.empty(batch, n, dtype=dtype, device=device)
    col_part = torch.empty(batch, n, dtype=dtype, device=device)
    jumps = max(1, (n - 1).bit_length())  # enough to flatten any forest of depth < n
    labels = torch.arange(n, device=device).repeat(batch, 1)
    while True:
        weight = (n - labels).to(dtype)  # in [1, n]: the larger, the smaller the label
        col_best.zero_()
        for i in range(0, n, step):
            rows = bytes_[:, i:i + step]
            prod = block[:, : rows.shape[1]]
            torch.mul(rows, weight.unsqueeze(1), out=prod)  # A[i, j] * weight[j]
            torch.amax(prod, dim=-1, out=row_best[:, i:i + step])
            torch.mul(rows, weight[:, i:i + step].unsqueeze(2), out=prod)  # A[i, j] * weight[i]
            torch.amax(prod, dim=-2, out=col_part)
            torch.maximum(col_best, col_part, out=col_best)
        smallest = n - torch.maximum(row_best, col_best).long()
        if torch.equal(smallest, labels):
            return labels
        labels = _flatten(labels.scatter_reduce(1, labels, smallest, reduce="amin"), jumps)


def _flatten(parent: torch.Tensor, jumps: int) -> torch.Tensor:
    """Point every node at its root by pointer jumping (a fixed count: no host sync)."""
    for _ in range(jumps):
        parent = parent.gather(1, parent)
    return parent


# ----------------------------------------------------------------------------------------------
# The compressor


@register
@dataclass
class Scissor(Compressor):
    """`+method=scissor tau=0.9`, or `retention=r` to calibrate tau to a token retention."""

    name = "scissor"
    stages = frozenset({"visual"})
    # a requested retention is reached by bisecting tau: -1 merges (almost) everything, 1 nothing
    retention_knob = RetentionKnob("tau", measure="rho_tok")
    label_knobs = ("tau",)
    tau: float = cosine_threshold(0.9, "an edge joins two tokens whose cosine exceeds tau")
    epsilon: float = knob(0.05, "error tolerance of the sampled component search", low=0.0, low_open=True)

    def flops(self, frames: int, tokens: int, dim: int) -> float:
        """An upper bound of the dense products it cannot avoid: each frame's N x N similarities, then
        the temporal similarities and the assignment, bounded by F*N representatives (the real count,
        the spatial components, depends on the video)."""
        n = frames * tokens
        return 2 * dim * (frames * tokens * tokens + 2 * n * n)

    def compress(self, x: VisualInput) -> torch.Tensor:
        # a fresh generator per video: the sampled regime depends on the seed, never on which
        # samples ran before (resume and data-parallel shards give the same tokens)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return scissor_compress(x.features, self.tau, self.epsilon, generator)
