"""FlashVID: cut the video into segments, keep each frame's tokens chosen by attention and diversity
(ADTS), merge the rest into temporal trees and cluster their roots per frame (TSTM, DPC-kNN), then
prune the kept video tokens once more inside the LLM by the last prompt token's attention (FastV).

Paper: Fan et al., "FlashVID: Efficient Video Large Language Models via Training-free Tree-based
Spatiotemporal Token Merging", ICLR 2026. Official code followed: Fanziyang-v/FlashVID, read at
commit 1d37422 (2026-02-12): `flashvid/__init__.py::flashvid` (the wrapper's defaults),
`flashvid/utils.py::{flashvid_compression, segment, additional_segment, segment_compression,
spatiotemporal_compression, dpc_knn, fastv_prune}`, `flashvid/token_selection.py::
{attn_div_v2_based_token_selection (LLaVA-OV), attn_div_based_token_selection (Qwen2.5-VL)}`,
`flashvid/llava_arch.py` (visual stage, newline, positions), `flashvid/siglip_encoder.py::
SigLipAttention_forward` (scores), `flashvid/modeling_qwen2.py::Qwen2Model_forward` and
`flashvid/modeling_qwen2_5_vl.py` (prefill pruning, Qwen2.5-VL scores and positions); defaults
from `scripts/llava_ov.sh` (LLaVA-OneVision) and `scripts/qwen2_5_vl.sh`.

Visual stage, on pooled features X (F, N, D) and `patch_scores` pooled to the feature grid like
the features (`methods.topk.pooled_scores`), which is the official `cls_attention`: on LLaVA-OV
the last encoder layer's attention, mean over heads then queries, pooled by `get_2dPool`; on
Qwen2.5-VL (X = the merger's outputs per temporal patch) the last vision block's attention within
each temporal patch, mean over heads and queries, averaged over each merge unit's four patches,
window order undone:
1. Segments (`segment`, `additional_segment`): g_f = mean_n X[f]; a cut after every frame f with
   cos(g_f, g_f+1) < segment_threshold; while fewer than min_segments segments, cuts at the smallest
   remaining similarities.
2. Budget per frame (`flashvid_compression`): B = ceil(N * retention * expansion), A = ceil(alpha*B)
   ADTS tokens, S = B - A tokens for TSTM.
3. ADTS (`attn_div_v2_based_token_selection`), per frame of segment G: a_j = score_j * 1e6,
   e_j = mean over the frames c of G of <x_j, g_c> (raw dot products), D_ij = (1 - cos(x_i, x_j))
   * a_j * e_j. First pick: argmax_j of the second-smallest D_ij over i; then A - 1 times argmax_j
   of min over the picked s of D_sj (v2 does not mask picked tokens, so a token can be picked
   again when no unpicked one scores above the picked ones' 0: followed, duplicates are output
   twice as official). `selection=attn_div` (v1, the Qwen2.5-VL script): no e_j, picked tokens
   scored -1.
4. TSTM (`spatiotemporal_compression`) on the non-ADTS tokens of a segment of >= 2 frames: token i
   of frame t >= 1 takes p(i) = the most cosine-similar non-ADTS token of frame t-1, value m_i
   (first frame: m = -1); it merges into p(i) iff m_i > temporal_threshold. If fewer than B*|G|
   tokens (ADTS included) stay unmerged, the threshold becomes the (|G|*N - B*|G|)-th largest m
   of the segment, at least -1 + 1e-6. Trees add up from the last frame back; a root becomes its
   tree's sum divided by 1 + its number of *direct* children (official quirk, followed).
5. gamma = S*|G| / (roots of G); if gamma < 1, each frame's n roots become c = ceil(n*gamma)
   clusters by DPC-kNN (k = min(c, 7); methods/core/clustering.py), a cluster being the plain mean
   of its members placed at its centre's index; else every root is kept.
6. Output: ADTS tokens (the input features) and clusters/roots, sorted by their index f*N + n.
Prefill stage (`fastv_prune`): before layer K the last prompt token's softmax attention at layer
K-1 (RoPE applied, grouped KV heads expanded, mean over heads; `methods.fastv.PruneByLastToken`
through `PrefillView.attention`) keeps ceil(llm_keep * V') of the V' video tokens the visual stage
output (official `math.ceil`; the OneVision newline is text here, as in the official V'), in
order; kept tokens keep their position ids and layers >= K cache only them (the shared driver).

Retention. `retention` r is the official `retention_ratio`, set directly: the share of video
tokens averaged over the LLM's layers. The visual stage keeps about r*e of them (the budget B
per frame, rho_visual), layers >= K about r*e*llm_keep (what the harness's rho_tok counts: its
first pruned layer), so with the official e = 1.25, K = 20 of L = 28 layers and llm_keep = 0.3,
e*(K + (L - K)*llm_keep)/L = 1 and rho_avg ~ r (a little above: the ceilings add up to one token per
frame and stage). Other depths: K defaults to round(20*L/28) = round(5L/7) (choice of this
harness, keeping that identity: 17 of 24 layers for LLaVA-OV-0.5B, 6 of the tiny model's 8).
`retention_knob.measure` is rho_flops (choice of this harness: RetentionKnob offers rho_tok and
rho_flops, and the layer-averaged share is nearer the FLOPs share than the first pruned layer's;
it matters only when a pipeline searches the knob).

Models. Knob defaults are the official LLaVA-OneVision ones (`scripts/llava_ov.sh`). A method
cannot see which model runs it, so (choice of this harness) the official Qwen2.5-VL setting is
chosen by knobs:
`selection=attn_div min_segments=4 positions=original` (`scripts/qwen2_5_vl.sh`). `positions`:
the official LLaVA-OV path concatenates the compressed tokens (contiguous positions, `compact`,
the default); the official Qwen2.5-VL path scatters each token to its index, keeping its mRoPE
id (`original`: the visual stage returns VideoTokens).

Deviations from the official code, and choices of this harness:
- Segments (choice): the extra cuts are taken among the transitions not already cut (the official
  code resets those to 1.0 and takes the smallest, so with fewer non-cut transitions than missing
  cuts, or cosines >= 1, it picks a cut twice and makes an empty segment); at most F - 1 cuts, so
  F < min_segments gives F one-frame segments. Ties: the earlier transition (official topk:
  unspecified).
- B is capped at N (official: B > N for retention*expansion > 1 and then `topk(k < 0)` fails);
  the TSTM threshold with no merge allowed (B = N) is +inf (official `topk(k=0)` fails);
  temporal_threshold >= 1 means no temporal merge (official skips TSTM, then divides by zero).
- One-frame segments (followed, official quirk): `segment_compression` passes the whole frame,
  ADTS tokens included, to the clustering (n = N roots, gamma = S/N), so an ADTS token can also
  be a member or the centre of a cluster (then its index appears twice, ADTS token first).
- The ADTS distance 1 - cos has an exact zero diagonal (official float round-off leaves about
  1e-7 there); a zero feature has cosine 0 to everything (official: NaN).
- Decisions and merges in float32 (official: the model dtype for the tree sums and cluster means);
  output in the input dtype. e_j is computed as <x_j, mean_c g_c> (equal to the mean of the dot
  products up to rounding). Tree sums are accumulated per root (each root's tree in one sum,
  official: frame by frame), equal up to rounding.
- DPC-kNN: methods/core/clustering.py's `density_peaks` and `assign_to_centres`, with its deviations
  (seeded 1e-6 noise, matmul distances, ties to the lower index). The noise is drawn per clustered
  frame, a (1, n) draw in frame order from one generator seeded by the run, as the official call
  order (official: unseeded `rand_like`). A cluster's plain mean is one index_add per frame (the
  official one-hot einsum divided by the counts; clustering.py's `cluster_mean`, a scatter_add over
  an expanded index, is several times slower on the CPU at D = 3584).
- Prefill: the attention row is recomputed in float32 from layer K-1's input (official: that
  layer's own q, k in the model dtype, softmax in float32); decode steps do not prune and layers
  < K keep the full cache, as official.
- Ties in every argmax/top-k go to the lower index (official torch.topk: unspecified); at equal
  output index the ADTS token comes first (official argsort: unstable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import (
    Compressor,
    RetentionKnob,
    VideoTokens,
    VisualInput,
    check_layer,
    cosine_threshold,
    fraction,
    knob,
    layer,
    share,
)
from methods.core.clustering import assign_to_centres, density_peaks
from methods.core.flops import LLMShape
from methods.core.select import top_k
from methods.core.similarity import cosine, segments_from_cuts, unit_rows
from methods.fastv import PruneByLastToken
from methods.topk import pooled_scores

__all__ = ["FlashVID", "FlashVIDVisual", "adts_select", "budgets", "flashvid_compress", "flashvid_visual",
           "pruned_count", "segment_bounds", "temporal_trees"]

OFFICIAL_LAYER = 20  # PRUNING_LAYER on the 28-layer LLaVA-OV-7B and Qwen2.5-VL-7B
ATTENTION_SCALE = 1e6  # official: cls_attention * 1e6 "to avoid numerical issues"
KNN = 7  # official dpc_knn k = min(clusters, 7)
SELECTIONS = ("attn_div_v2", "attn_div")


# ---- budgets and segments --------------------------------------------------------------------------
def budgets(tokens_per_frame: int, retention: float, expansion: float, alpha: float) -> tuple[int, int, int]:
    """(B, A, S) per frame: B = ceil(N*r*e) (the official float expression), capped at N;
    A = ceil(alpha*B) ADTS tokens; S = B - A TSTM tokens."""
    budget = min(tokens_per_frame, math.ceil(tokens_per_frame * retention * expansion))
    selected = math.ceil(budget * alpha)
    return budget, selected, budget - selected


def segment_bounds(frame_means: torch.Tensor, threshold: float, min_segments: int) -> list[tuple[int, int]]:
    """(F, D) frame means -> [(start, end), ...]: cut after every frame whose cosine with the next
    is below `threshold`, then, while fewer than `min_segments` segments, after the not yet cut
    transitions of smallest cosine (ties: the earlier one), at most F - 1 cuts."""
    frames = frame_means.shape[0]
    sims = cosine(frame_means[:-1], frame_means[1:])  # (F - 1,)
    cuts = sims < threshold
    missing = min(min_segments - 1, frames - 1) - int(cuts.sum())
    if missing > 0:
        order = torch.sort(torch.where(cuts, math.inf, sims), stable=True).indices
        cuts[order[:missing]] = True  # the cut transitions sort last, after every uncut one
    return segments_from_cuts(cuts, frames)


def _segment_ids(bounds: list[tuple[int, int]], device) -> torch.Tensor:
    lengths = torch.tensor([end - start for start, end in bounds], device=device)
    return torch.repeat_interleave(torch.arange(len(bounds), device=device), lengths)


# ---- ADTS ------------------------------------------------------------------------------------------
def adts_select(x: torch.Tensor, unit: torch.Tensor, scores: torch.Tensor, segment_mean: torch.Tensor,
                count: int, selection: str = "attn_div_v2") -> torch.Tensor:
    """Attention-and-diversity token selection of every frame at once.

    x (F, N, D) float32 features, unit its unit rows, scores (F, N) attention, segment_mean (F, D)
    the mean token of each frame's segment (v2's event relevance e_j = <x_j, segment_mean>) ->
    (F, count) picked indices, ascending (v2 may pick a token twice)."""
    frames, n, _ = x.shape
    dist = 1.0 - unit @ unit.mT  # (F, N, N) cosine distance
    dist.diagonal(dim1=1, dim2=2).zero_()
    weighted = dist * (scores * ATTENTION_SCALE)[:, None, :]  # column j scaled by a_j
    if selection == "attn_div_v2":
        relevance = torch.einsum("fnd,fd->fn", x, segment_mean)
        weighted = weighted * relevance[:, None, :]
    rows = torch.arange(frames, device=x.device)
    pick = torch.topk(weighted, k=min(2, n), dim=1, largest=False).values[:, -1].argmax(-1)  # (F,)
    picks = [pick]
    nearest = weighted[rows, pick]  # (F, N): min over the picked s of D_sj
    picked = torch.zeros(frames, n, dtype=torch.bool, device=x.device)
    for _ in range(1, count):
        if selection == "attn_div":  # v1: a picked token is never picked again
            picked[rows, pick] = True
            pick = nearest.masked_fill(picked, -1.0).argmax(-1)
        else:
            pick = nearest.argmax(-1)
        picks.append(pick)
        nearest = torch.minimum(nearest, weighted[rows, pick])
    return torch.stack(picks, 1).sort(dim=1).values


# ---- TSTM ------------------------------------------------------------------------------------------
@dataclass
class Trees:
    """The temporal trees of a video: which tokens merged into which, and each frame's roots."""

    merged: torch.Tensor  # (F, N) bool: merged into its parent in the previous frame
    parent: torch.Tensor  # (F, N) long: p(i) in the previous frame (meaningful where merged)
    similarity: torch.Tensor  # (F, N) m_i (-1 in a segment's first frame and for ADTS tokens)
    roots: list[torch.Tensor]  # per frame: the token indices n of its roots to cluster, ascending
    values: list[torch.Tensor]  # per frame: (n_f, D) float32 root values, tree sum / (1 + direct children)


def temporal_trees(x: torch.Tensor, unit: torch.Tensor, selected: torch.Tensor,
                   bounds: list[tuple[int, int]], threshold: float, budget: int) -> Trees:
    """TSTM over the segments `bounds` of x (F, N, D) float32 (unit: its unit rows); `selected`
    (F, N) bool marks the ADTS tokens; `budget` = B, the per-frame floor of unmerged tokens.

    Roots to cluster: in a segment of >= 2 frames its unmerged non-ADTS tokens; in a one-frame
    segment every token of the frame (the official single-frame branch; its values are x[f])."""
    frames, n, dim = x.shape
    device = x.device
    similarity = torch.full((frames, n), -1.0, device=device)
    parent = torch.zeros(frames, n, dtype=torch.long, device=device)
    multi = [(s, e) for s, e in bounds if e - s > 1]
    for s, e in multi:  # views: only the transitions inside a segment are compared
        sim = unit[s + 1:e] @ unit[s:e - 1].mT  # [t, i, m] = cos(x[t+1, i], x[t, m])
        sim.masked_fill_(selected[s + 1:e, :, None], -1.0)
        sim.masked_fill_(selected[s:e - 1, None, :], -1.0)
        similarity[s + 1:e], parent[s + 1:e] = sim.max(-1)  # the first maximum
    merged = torch.zeros(frames, n, dtype=torch.bool, device=device)
    if multi and threshold < 1.0:
        segment = _segment_ids(bounds, device)
        above = torch.zeros(len(bounds), dtype=torch.long, device=device)
        above.index_add_(0, segment, (similarity > threshold).sum(1))
        allowed = torch.tensor([(e - s) * (n - budget) for s, e in bounds], device=device)  # keeps B*|G|
        # the allowed-th largest m of each segment: m descending within segments (two stable sorts)
        flat = similarity.flatten()
        order = torch.sort(flat, descending=True, stable=True).indices
        order = order[torch.sort(segment.repeat_interleave(n)[order], stable=True).indices]
        start = torch.tensor([s * n for s, _ in bounds], device=device)
        kth = flat[order][(start + allowed - 1).clamp(min=0)].clamp(min=-1.0 + 1e-6)
        soft = torch.where(allowed > 0, kth, math.inf)  # no merge allowed (B = N)
        cut = torch.where(above > allowed, soft, threshold)
        merged = similarity > cut[segment][:, None]  # a first frame's m = -1 never exceeds it

    roots: list = [None] * frames
    values: list = [None] * frames
    everything = torch.arange(n, device=device)
    for s, e in bounds:
        if e - s == 1:
            roots[s], values[s] = everything, x[s]
    if not multi:
        return Trees(merged, parent, similarity, roots, values)
    # each token's root: follow the parents (pointer doubling; a path spans < F frames)
    own = torch.arange(frames * n, device=device)
    up = torch.where(merged.flatten(), own - own % n - n + parent.flatten(), own)  # the parent's flat index
    top = up
    for _ in range(math.ceil(math.log2(max(e - s for s, e in multi)))):
        top = top[top]
    is_root = ~merged & ~selected
    found = is_root.flatten().nonzero().flatten()  # frame-major, ascending
    per_frame = is_root.sum(1).tolist()  # host sync
    offset = [0]
    for c in per_frame:
        offset.append(offset[-1] + c)
    ones = torch.ones(max(e - s for s, e in multi) * n, device=device)
    for s, e in multi:  # one pass over the segment's tokens: each adds itself into its root's row
        mine = found[offset[s]:offset[e]] - s * n
        spare = len(mine)  # the ADTS tokens' row, dropped
        slot = torch.full(((e - s) * n,), spare, dtype=torch.long, device=device)
        slot[mine] = torch.arange(spare, device=device)
        sums = torch.zeros(spare + 1, dim, device=device)
        sums.index_add_(0, slot[top[s * n:e * n] - s * n], x[s:e].reshape(-1, dim))
        children = torch.zeros(spare + 1, device=device)  # direct children of each root
        children.index_add_(0, torch.where(merged[s:e].flatten(), slot[up[s * n:e * n] - s * n], spare),
                            ones[:(e - s) * n])
        sums = sums[:spare] / (1.0 + children[:spare, None])
        for f in range(s, e):
            roots[f] = mine[offset[f] - offset[s]:offset[f + 1] - offset[s]] - (f - s) * n
            values[f] = sums[offset[f] - offset[s]:offset[f + 1] - offset[s]]
    return Trees(merged, parent, similarity, roots, values)


def _plain_mean(values: torch.Tensor, label: torch.Tensor, clusters: int) -> torch.Tensor:
    """(n, D), (n,) labels -> (clusters, D) the mean of each cluster's members (none is empty)."""
    sums = torch.zeros(clusters, values.shape[1], device=values.device).index_add_(0, label, values)
    counts = torch.zeros(clusters, device=values.device).index_add_(0, label, torch.ones_like(values[:, 0]))
    return sums / counts[:, None]


# ---- the visual stage ------------------------------------------------------------------------------
@dataclass
class FlashVIDVisual:
    tokens: torch.Tensor  # (M, D) in the input dtype, sorted by index
    positions: torch.Tensor  # (M,) long: f*N + n of each token (an ADTS token or a cluster centre)
    segments: list[tuple[int, int]]  # [start, end) frame ranges
    budget: tuple[int, int, int]  # (B, A, S) per frame
    selected: torch.Tensor  # (F, A) ADTS picks per frame, ascending
    roots: list[int]  # per frame: roots to cluster (n)
    clusters: list[int]  # per frame: cluster/root tokens output (c, or n when gamma >= 1)


@torch.no_grad()
def flashvid_visual(features: torch.Tensor, scores: torch.Tensor, retention: float = 0.25,
                    expansion: float = 1.25, alpha: float = 0.7, temporal_threshold: float = 0.8,
                    segment_threshold: float = 0.9, min_segments: int = 8, selection: str = "attn_div_v2",
                    generator: torch.Generator | None = None) -> FlashVIDVisual:
    """FlashVID's visual stage on features (F, N, D) with per-token attention scores (F, N) on the
    same grid; `generator` draws the DPC-kNN noise (None: no noise)."""
    if features.dim() != 3 or scores.shape != features.shape[:2]:
        raise ValueError(f"flashvid: expected features (F, N, D) and scores (F, N), got "
                         f"{tuple(features.shape)} and {tuple(scores.shape)}")
    if selection not in SELECTIONS:
        raise ValueError(f"flashvid.selection={selection!r}: expected one of {', '.join(SELECTIONS)}")
    frames, n, dim = features.shape
    device = features.device
    x = features.float()
    scores = scores.to(device=device, dtype=torch.float32)
    budget, count, rest = budgets(n, retention, expansion, alpha)

    # 1. segments (one host sync)
    means = x.mean(1)
    bounds = segment_bounds(means, segment_threshold, min_segments)
    segment = _segment_ids(bounds, device)
    unit = unit_rows(x)

    # 2-3. ADTS, every frame at once
    offsets = torch.arange(frames, device=device)[:, None] * n
    selected = torch.zeros(frames, n, dtype=torch.bool, device=device)
    picks = torch.zeros(frames, 0, dtype=torch.long, device=device)
    if count > 0:
        sums = torch.zeros(len(bounds), dim, device=device).index_add_(0, segment, means)
        lengths = torch.tensor([e - s for s, e in bounds], device=device, dtype=torch.float32)
        picks = adts_select(x, unit, scores, (sums / lengths[:, None])[segment], count, selection)
        selected.scatter_(1, picks, True)
    positions = [(picks + offsets).flatten()]
    tokens = [x.flatten(0, 1).index_select(0, positions[0])]

    # 4-5. TSTM, then DPC-kNN on each frame's roots (frame by frame: the noise is drawn in frame order)
    roots_per_frame, out_per_frame = [0] * frames, [0] * frames
    if rest > 0:
        trees = temporal_trees(x, unit, selected, bounds, temporal_threshold, budget)
        roots_per_frame = [len(r) for r in trees.roots]
        for s, e in bounds:
            gamma = rest * (e - s) / sum(roots_per_frame[s:e])  # the official float expression
            for f in range(s, e):
                values, want = trees.values[f], math.ceil(roots_per_frame[f] * gamma)
                if want > 0 and gamma < 1.0:
                    peaks = density_peaks(values[None], min(want, KNN), generator)
                    centre = top_k(peaks.score, want)  # score order: assignment ties go to the first
                    label = assign_to_centres(peaks.distance, centre)[0]
                    tokens.append(_plain_mean(values, label, want))
                    positions.append(trees.roots[f][centre[0]] + f * n)
                    out_per_frame[f] = want
                else:  # every root stays
                    tokens.append(values)
                    positions.append(trees.roots[f] + f * n)
                    out_per_frame[f] = roots_per_frame[f]

    # 6. by index (ADTS first at an equal index), written once into the output
    flat_positions = torch.cat(positions)
    order = torch.sort(flat_positions, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=device)
    out = torch.empty(len(order), dim, dtype=features.dtype, device=device)
    start = 0
    for chunk in tokens:
        out.index_copy_(0, rank[start:start + len(chunk)], chunk.to(features.dtype))
        start += len(chunk)
    return FlashVIDVisual(out, flat_positions[order], bounds, (budget, count, rest), picks,
                          roots_per_frame, out_per_frame)


def flashvid_compress(features: torch.Tensor, scores: torch.Tensor, retention: float = 0.25,
                      expansion: float = 1.25, alpha: float = 0.7, temporal_threshold: float = 0.8,
                      segment_threshold: float = 0.9, min_segments: int = 8, selection: str = "attn_div_v2",
                      generator: torch.Generator | None = None) -> VideoTokens:
    """(F, N, D) features + (F, N) scores -> VideoTokens (tokens sorted by index, their indices)."""
    out = flashvid_visual(features, scores, retention, expansion, alpha, temporal_threshold,
                          segment_threshold, min_segments, selection, generator)
    return VideoTokens(out.tokens, out.positions)


# ---- the prefill stage ---------------------------------------------------------------------------
def pruned_count(keep: float, video_tokens: int, stages: int = 1) -> list[int]:
    """Video tokens kept from layer K on: [ceil(V' * keep)] (official `fastv_prune`), at most V'."""
    return [min(video_tokens, math.ceil(video_tokens * keep))] * stages


# ---- the compressor --------------------------------------------------------------------------------
@register
@dataclass
class FlashVID(Compressor):
    """`+method=flashvid retention=0.25`; Qwen2.5-VL's official setting: add `method.selection=attn_div
    method.min_segments=4 method.positions=original`."""

    name = "flashvid"
    stages = frozenset({"visual", "prefill"})
    retention_knob = RetentionKnob("retention", measure="rho_flops", direct=True)
    label_knobs = ("retention",)
    needs = frozenset({"patch_scores"})
    retention: float = fraction(0.25, "official retention_ratio: the share of video tokens averaged over "
                                "the LLM's layers (the visual stage keeps about retention*expansion)")
    expansion: float = knob(1.25, "the visual stage's budget is retention*expansion of each frame",
                            low=0.0, low_open=True)
    alpha: float = share(0.7, "share of a frame's budget chosen by ADTS (the rest: TSTM clusters)")
    temporal_threshold: float = cosine_threshold(0.8, "a token merges into its most similar token of "
                                                 "the previous frame when their cosine exceeds this")
    segment_threshold: float = cosine_threshold(0.9, "cut between frames whose mean features' cosine "
                                                "is below this")
    min_segments: int = knob(8, "at least this many segments (Qwen2.5-VL official: 4)", kind="integer", low=1)
    selection: str = knob("attn_div_v2", "ADTS variant (Qwen2.5-VL official: attn_div)", kind="choice",
                          choices=SELECTIONS)
    pruning_layer: int | None = layer(None, "the LLM prunes before this layer (null: official 20 of 28 "
                                      "layers, scaled to the LLM's depth)")
    llm_keep: float = fraction(0.3, "share of the visual stage's tokens kept from pruning_layer on "
                               "(official llm_retention_ratio; 1 switches the LLM stage off)")
    positions: str = knob("compact", "compact: the kept tokens take consecutive positions (official "
                          "LLaVA-OV); original: each keeps its own (official Qwen2.5-VL)",
                          kind="choice", choices=("compact", "original"))

    def compress(self, x: VisualInput) -> torch.Tensor | VideoTokens:
        if x.patch_scores is None:
            raise ValueError("flashvid needs the vision encoder's patch attention (patch_scores)")
        scores = pooled_scores(x.patch_scores, x.grid, x.patch_grid)
        generator = torch.Generator("cpu").manual_seed(self.seed)  # per video: resumable, shardable
        out = flashvid_visual(x.features, scores, self.retention, self.expansion, self.alpha,
                              self.temporal_threshold, self.segment_threshold, self.min_segments,
                              self.selection, generator)
        return VideoTokens(out.tokens, out.positions) if self.positions == "original" else out.tokens

    def prefill_policy(self, llm: LLMShape) -> PruneByLastToken:
        layer = (llm.scaled_layer(OFFICIAL_LAYER) if self.pruning_layer is None
                 else check_layer("flashvid.pruning_layer", self.pruning_layer, llm.layers))
        return PruneByLastToken((layer,), self.llm_keep, llm.layers, counts=pruned_count)
