"""PruneVid: merge static tokens over time and cluster each frame's tokens, then prune inside the LLM.

Visual stage: cut the video into contiguous segments (density-peak clustering of frame means), average
each segment's static positions over time, cluster each set of tokens by density peaks; prefill stage:
after layer `llm_layer`, keep `llm_keep` of each group's video tokens by the question tokens' attention.

Paper: Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
ACL 2025, arXiv:2412.16117. Official code followed: Visual-AI/PruneVid, read at commit
b12600c, `models/pllava/modeling_pllava.py` (`merge_frames_dynamic`, `cluster_dpc_knn`,
`refine_clusters`, `segment_lengths`, `compute_cluster_vectors`), `models/pllava/llama.py`
(`LlamaModelVTP`, the `attn_weights_wo_pos` of `LlamaAttention.forward`) and `VTPWindowCache` in
`models/pllava/elastic_cache.py`. Defaults: PruneVid `scripts/eval.sh`
(tau 0.8, temporal_segment_ratio 0.25, cluster_ratio 0.5, selected_layer 10, alpha 0.4, k 7).

The algorithm, in the official code's detail:
1. Segments: DPC-kNN (k = 7, methods/core/clustering.py) on the frame means (mean over the frame's N
   tokens) with int(F * segment_ratio) clusters, each frame to its nearest centre; then the official
   contiguity refinement (`refine_labels`): a label keeps only its longest runs (none if its longest
   run is one frame), freed runs go to the neighbouring run that is longer (left on ties, label 0
   without neighbours); segments are the runs of equal labels.
2. Static positions of a segment of W frames: the mean pairwise cosine over the W(W-1) ordered
   pairs of distinct frames at that position, (sum_w sum_t cos - W) / (W(W-1)), > tau (strict).
   Static tokens are the plain mean over the segment's frames; W = 1 has no static position.
3. The segment's static set, and each frame's dynamic set, with more than 14 tokens is clustered
   (DPC-kNN, k = 7) into int(n * cluster_ratio) clusters: each token to its nearest centre
   (Euclidean / sqrt(D), ties to the higher-scored centre), centres to themselves; a cluster
   becomes the plain mean of its members. Sets of at most 14 tokens are kept as they are.
4. Prefill: the attention of layer `llm_layer` (0-based), recomputed from that layer's input without
   RoPE and without the causal mask (softmax over every key, float32), of every token after the
   video (the question, the chat template's tail, the video's trailing newline) over the video
   tokens; score = max over heads, then max over those queries. Each group (a segment's static
   tokens; one frame's dynamic tokens) keeps its int(size * llm_keep) best-scored tokens (none when
   that is 0); layers llm_layer+1 .. L-1 see only the kept video tokens.

Deviations, and choices where the official code leaves room:
- Token order and positions (choice of this harness: outputs keep the original frame-major,
  row-major order): every output token takes the position id of a real input token and tokens
  are in position order (`VideoTokens`). A cluster sits at its centre's position; a segment's
  static tokens sit in the segment's first frame at their (centre's) grid position; an unclustered
  token at its own. Official: static tokens first, then each frame's dynamic tokens, clusters in
  DPC score order, contiguous position ids (PLLaVA renumbers).
- The KV caches of layers 0..llm_layer keep every video token (this harness's prefill contract; official
  also cuts them to the kept tokens, so decode steps there see only kept tokens).
- Decisions in float32 (official: frame means, static test and attention in the model's fp16/bf16);
  the attention is not cast back to the model dtype before ranking.
- DPC tie-break noise from the run's seeded generator (methods/core/clustering.py), drawn in this order:
  the frame clustering (1, F), then per segment the static set (1, S) if S > 14 and the dynamic
  sets (W, N - S) if N - S > 14. Ties in any top-k go to the lower index (official: unspecified).
- Grouped-query attention (Qwen2): each query head uses its key head (official LLaMA has none).
- Guards the official code lacks: at least one and at most F segment clusters (F * 0.25 < 1 would
  crash it), k capped at the number of frames; the mean pairwise cosine is capped at 1 (it can
  exceed 1 by round-off), so tau = 1 means "nothing is static"; int(n * cluster_ratio) = 0 drops
  the set (as official); with no `view.groups` (the visual stage was another method's) all video
  tokens form one group.
- `llm_layer` left at None is the official 10 of 28 layers scaled to the LLM's depth
  (round(10 * L / 28), within 1..L-2) so that the 8-layer tiny model works.
`retention=r` calibrates cluster_ratio (rho_tok, bisection): rho_tok counts the video tokens at the
first pruned LLM layer, i.e. after both stages; `planned` gives the exact per-layer counts from the
visual stage's groups. The reachable range is therefore at most llm_keep times what the static merge
leaves at cluster_ratio = 1: on the smoke task (the tiny model's frames are nearly all static at
tau = 0.8) that is 0-8 %, and retention=0.25 needs method.tau=1.0 (no static merging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.core.attention import project
from methods.core.base import (
    Compressor,
    RetentionKnob,
    VideoTokens,
    VisualInput,
    check_layer,
    cosine_threshold,
    fraction,
    layer,
    share,
)
from methods.core.clustering import assign_to_centres, cluster_mean, density_peaks
from methods.core.decoder import Keep, PrefillView
from methods.core.flops import LLMShape
from methods.core.select import top_k
from methods.core.similarity import normalized, segment_ids

__all__ = ["prunevid_compress", "refine_labels", "frame_segments", "question_scores",
           "keep_per_group", "group_budget", "PruneVidPrefill", "PruneVid"]

KNN = 7  # neighbours of the DPC-kNN density, everywhere (official)
MIN_CLUSTERED = 15  # sets with more than 14 tokens are clustered (official `> 14`)
OFFICIAL_LAYER = 10  # selected_layer of the 32-layer LLaMA run, kept for 28 layers


# ---- visual stage ----------------------------------------------------------------------------------
def refine_labels(labels: list[int]) -> list[int]:
    """The official contiguity refinement of per-frame cluster labels (`refine_clusters`).

    A label keeps its longest runs (every run of that length); its other runs, and every run of a
    label whose longest run is a single frame, are freed. Left to right, each maximal freed run
    takes the label of the longer neighbouring run (measured on the labels as refined so far),
    the left one on ties, label 0 if it has no neighbour.
    """
    n = len(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i in range(1, n + 1):
        if i == n or labels[i] != labels[start]:
            runs.setdefault(labels[start], []).append((start, i))
            start = i
    refined = list(labels)
    for spans in runs.values():
        longest = max(b - a for a, b in spans)
        for a, b in spans:
            if longest == 1 or b - a < longest:
                refined[a:b] = [-1] * (b - a)
    i = 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < n and refined[i] == -1:
            i += 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left, j = refined[start - 1], start - 1
            while j >= 0 and refined[j] == left:
                j -= 1
            left_len = start - 1 - j
        if i < n:
            right, j = refined[i], i
            while j < n and refined[j] == right:
                j += 1
            right_len = j - i
        if right_len > left_len:
            label = right
        else:
            label = left if left is not None else right
        refined[start:i] = [0 if label is None else label] * (i - start)
    return refined


def frame_segments(features: torch.Tensor, segment_ratio: float,
                   generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """(F, N, D) -> contiguous [start, end) frame segments: DPC-kNN on the frame means, refined."""
    frames = features.shape[0]
    means = features.float().mean(1)[None]  # (1, F, D)
    peaks = density_peaks(means, KNN, generator)
    clusters = min(frames, max(1, int(frames * segment_ratio)))
    label = assign_to_centres(peaks.distance, top_k(peaks.score, clusters))[0]
    refined = refine_labels(label.tolist())
    bounds = [0] + [t for t in range(1, frames) if refined[t] != refined[t - 1]] + [frames]
    return list(zip(bounds[:-1], bounds[1:]))


def _cluster(x: torch.Tensor, ratio: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of B sets (B, n, D) float32 -> (means (B, c, D), centres (B, c) into the set),
    c = int(n * ratio) clusters each; sets of at most 14 tokens are returned as they are."""
    batch, n, _ = x.shape
    if n < MIN_CLUSTERED:
        return x, torch.arange(n, device=x.device).expand(batch, n)
    peaks = density_peaks(x, KNN, generator)  # drawn even when no cluster is kept, as official
    clusters = int(n * ratio)
    if clusters == 0:
        return x[:, :0], torch.zeros(batch, 0, dtype=torch.long, device=x.device)
    centres = top_k(peaks.score, clusters)
    label = assign_to_centres(peaks.distance, centres)
    return cluster_mean(x, label, clusters), centres


@torch.no_grad()
def prunevid_compress(features: torch.Tensor, segment_ratio: float = 0.25, tau: float = 0.8,
                      cluster_ratio: float = 0.5, generator: torch.Generator | None = None) -> VideoTokens:
    """PruneVid's visual stage on (F, N, D) features -> VideoTokens (tokens, positions, groups).

    positions index the flattened F*N input (ascending); groups: frame t's dynamic tokens have
    group t, segment s's static tokens group F + s (the prefill stage prunes per group).
    """
    frames, n, dim = features.shape
    device = features.device
    x = features.float()
    segments = frame_segments(x, segment_ratio, generator)
    count = len(segments)
    seg = segment_ids(segments, device)
    lengths = torch.tensor([b - a for a, b in segments], device=device, dtype=torch.float32)
    # sum_w sum_t cos(x_w, x_t) at a position = |sum_w unit(x_w)|^2: one pass over the frames
    unit_sums = torch.zeros(count, n, dim, device=device).index_add_(0, seg, normalized(x))
    pairs = (lengths * (lengths - 1))[:, None]
    similarity = ((unit_sums * unit_sums).sum(-1) - lengths[:, None]) / pairs.clamp(min=1)
    static = (similarity.clamp(max=1.0) > tau) & (pairs > 0)  # (segments, N)
    means = torch.zeros(count, n, dim, device=device).index_add_(0, seg, x) / lengths[:, None, None]
    order = torch.argsort((~static).to(torch.uint8), dim=1, stable=True)  # static first, each ascending
    sizes = static.sum(1).tolist()  # the one host sync: set sizes decide the shapes

    pieces, positions, groups = [], [], []
    for s, ((a, b), size) in enumerate(zip(segments, sizes)):
        # static: one set per segment, placed in its first frame
        grid = order[s, :size]
        merged, centres = _cluster(means[s, grid][None], cluster_ratio, generator)
        pieces.append(merged[0])
        positions.append(a * n + grid[centres[0]])
        groups.append(torch.full((centres.shape[1],), frames + s, device=device))
        # dynamic: one set per frame, the same grid positions in every frame of the segment
        grid = order[s, size:]
        merged, centres = _cluster(x[a:b] if size == 0 else x[a:b, grid], cluster_ratio, generator)
        frame = torch.arange(a, b, device=device)[:, None]
        pieces.append(merged.flatten(0, 1))
        positions.append((frame * n + grid[centres]).flatten())
        groups.append(frame.expand_as(centres).flatten())
    positions = torch.cat(positions)
    order = torch.argsort(positions)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=device))
    tokens = features.new_empty(len(order), dim)  # each piece written once, at its tokens' ranks
    start = 0
    for piece in pieces:
        tokens.index_copy_(0, rank[start:start + len(piece)], piece.to(features.dtype))
        start += len(piece)
    return VideoTokens(tokens, positions[order], torch.cat(groups)[order])


# ---- prefill stage ---------------------------------------------------------------------------------
def question_scores(layer, hidden: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """PruneVid's score of the entries `keys` at decoder `layer` with input hidden (1, n, D): the
    attention of the entries `queries` over all n entries, without RoPE and without a causal mask
    (softmax in float32), max over heads, then max over the queries -> (len(keys),) float32."""
    if len(queries) == 0:  # nothing after the video: every token scores the same (lower index wins)
        return torch.zeros(len(keys), device=hidden.device)
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = project(attn, x[:, queries], "q").float()[0]  # (H, q, hd), no rotary embedding
    k = project(attn, x, "k").float()[0]  # (KV, n, hd)
    kv_heads = k.shape[0]
    q = q.view(kv_heads, q.shape[0] // kv_heads, *q.shape[1:])  # query head h reads key head h // groups
    weights = (q @ k[:, None].transpose(-1, -2) * attn.scaling).softmax(-1)  # (KV, groups, q, n)
    return weights[..., keys].flatten(0, 2).amax(0)


def group_budget(size: torch.Tensor, keep: float) -> torch.Tensor:
    """int(size * keep) per group (float64, as Python computes it)."""
    return (size.double() * keep).floor().long()


def keep_per_group(scores: torch.Tensor, groups: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices (ascending) of each group's int(size * keep) highest scores (ties: lower index)."""
    by_score = torch.sort(-scores, stable=True).indices
    by_group = by_score[torch.sort(groups[by_score], stable=True).indices]  # groups, best first
    sorted_groups = groups[by_group]
    first = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    size = torch.searchsorted(sorted_groups, sorted_groups, right=True) - first
    rank = torch.arange(len(scores), device=scores.device) - first
    return by_group[rank < group_budget(size, keep)].sort().values


@dataclass
class PruneVidPrefill:
    """Before layer score_layer + 1: keep each group's `keep` share of the video tokens, ranked by
    `question_scores` at layer score_layer."""

    score_layer: int
    keep: float
    depth: int

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.score_layer + 1,)

    def act(self, view: PrefillView) -> Keep:
        module, hidden, _ = view.layer_input(self.score_layer)
        scores = question_scores(module, hidden, view.query, view.video)
        groups = view.groups if view.groups is not None else torch.zeros_like(view.video)
        return Keep(keep_per_group(scores, groups, self.keep))

    def planned(self, video_tokens: int, groups: torch.Tensor | None = None) -> list[int]:
        if groups is None:
            groups = torch.zeros(video_tokens, dtype=torch.long)
        kept = int(group_budget(torch.unique(groups.cpu(), return_counts=True)[1], self.keep).sum())
        first = self.score_layer + 1
        return [video_tokens] * first + [kept] * (self.depth - first)


@register
@dataclass
class PruneVid(Compressor):
    """`+method=prunevid [method.cluster_ratio=0.5 method.llm_keep=0.4 ...]`, or `retention=r`."""

    name = "prunevid"
    stages = frozenset({"visual", "prefill"})
    # a requested retention (rho_tok at the first pruned layer) is reached by bisecting cluster_ratio
    retention_knob = RetentionKnob("cluster_ratio", measure="rho_tok")
    label_knobs = ("cluster_ratio", "llm_keep")
    segment_ratio: float = fraction(0.25, "segments per frame (about segment_ratio * F segments)")
    tau: float = cosine_threshold(0.8, "a position is static across its segment above this cosine")
    cluster_ratio: float = share(0.5, "share of each frame's tokens kept as density-peak clusters")
    llm_layer: int | None = layer(None, "question attention at this layer prunes after it (null: the "
                                  "official 10 of 28, scaled to the LLM's depth)", low=0)
    llm_keep: float = fraction(0.4, "share of each group's video tokens kept in the LLM")

    def compress(self, x: VisualInput) -> VideoTokens:
        # a fresh generator per video: the same video gives the same tokens whatever ran before
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return prunevid_compress(x.features, self.segment_ratio, self.tau, self.cluster_ratio, generator)

    def prefill_policy(self, llm: LLMShape) -> PruneVidPrefill:
        layer = (llm.scaled_layer(OFFICIAL_LAYER, highest=llm.layers - 2) if self.llm_layer is None
                 else check_layer("prunevid.llm_layer", self.llm_layer, llm.layers, low=0, high=llm.layers - 2))
        return PruneVidPrefill(layer, self.llm_keep, llm.layers)
