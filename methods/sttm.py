"""STTM: spatio-temporal token merging of the video hidden states inside the LLM, query-agnostic.

Before decoder layer K each frame's video hidden states become a quadtree (a node whose pooled state
is similar to all four of its children stands for its whole box), then nodes of consecutive frames
whose boxes nest and whose states are similar are merged across time; later layers see the merged run.

Paper: Hyun et al., "Multi-Granular Spatio-Temporal Token Merging for Training-Free Acceleration of
Video LLMs", ICCV 2025, arXiv:2507.07990.
Official code followed: HYUNJS/STTM, read at commit 00736c7, `token_merging_monkey_patch/
quadtree_attn_monkey_patch.py::Qwen2Model_forward` (LLaVA-OneVision / LLaVA-Video: the merge before
layer `sa_start_layer_idx`, compacted position ids), `token_merging_qwen2vl_monkey_patch/
quadtree_attn_monkey_patch.py::Qwen2VLModel_forward` (Qwen2-VL: original M-RoPE ids),
`token_merging_utils/quadtree_builder.py::{quadtree_build_video, quadtree_build_iteration_video}`,
`quadtree_spatial_merger.py::{avgpool_to_even_side_feature, pool_to_even_side_index_video}`,
`quadtree_temporal_merger.py::{get_cross_frame_node_pairs_fast, filter_cross_frame_node_pairs,
get_merge_dst_idx_safe, agg_feature_and_metadata}` (the "fast" path, `sttm_slow_ver` off); knobs
and presets from `scripts/eval/run_vidqa.sh` (`sttm_common_cfg`: layer 2, root level 1).

Algorithm, on the video hidden states entering layer K viewed as (F, h, w, D) (14x14 on OneVision):
1. Pyramid per frame by ceil-halving the sides (`avgpool_to_even_side_feature`): 2x2 means; on an
   odd side the first row / column is paired only along the other axis (1x2 / 2x1 stripes) and
   the top-left entry is copied. The levels run from the root level (official `size_per_level`:
   halve until a side is 2, level 1 of that list; 14 -> 4x4, 7x7, 14x14) to the token grid.
2. From every root node: compare (cosine, float32) its pooled state with its 4 child slots; emit
   the node if all 4 are >= tau_s, else recurse into its valid children; grid tokens are always
   emitted. Quirk of the official `pool_to_even_side_index_video`, followed: at an odd step the
   slots a first-row / first-column node does not have point at child (0, 0) of its frame and
   still count in the test (and the top-left node, a copy of that child, always passes).
3. Nodes are ordered by t*h*w + y0*w + x0 (their top-left token).
4. Temporal: candidate pairs are the nodes of frames t and t+1 whose boxes contain one another
   (either way); pairs with cosine >= tau_t (rows divided by norm + 1e-8, as the official
   `filter_cross_frame_node_pairs`) are joined by the official `get_merge_dst_idx_safe`: every
   node starts as its own representative; each round every paired node takes the smallest
   representative among its pairs (scatter `amin`), then rep <- rep[rep]; it stops as soon as rep
   is idempotent. Quirk (followed): that test can stop before every chain is joined, e.g. pairs
   (0, 5), (5, 10), (3, 10) end as {0, 5} and {3, 10} (a full union-find would give one group);
   the official numbers come from this rule. Each representative keeps its own index and box and
   takes the plain mean of the states that point to it (`weighted_avg` off).
5. The survivors, ascending (= step-3 order), replace the video run: each keeps the prompt index of
   its node's top-left token (`Keep.video`) with the merged state.

Positions (`positions` knob; null = each family's official path): compact on 1-D position ids
(LLaVA-OneVision: from layer K on the sequence, text included, takes the ids 0..M-1; decode steps
continue after the unmerged prompt, as Hugging Face `generate` does with the official patch;
`methods.core.decoder`'s `Keep.compact`), original on M-RoPE ids (Qwen2.5-VL: each survivor keeps
its top-left token's (t, h, w) ids, the official Qwen2-VL path). Compact departs from this
harness's keep-positions rule for in-LLM methods; it is what the official LLaVA code runs.
Query-agnostic: the merge reads only the video hidden states, so the engine prefills [head + video]
once per video and continues it with each question (`prefill_reads_question = False`); a compacted
prefix is continued at the compacted positions (`DecoderState.position_shift`).

Deviations and choices:
- Pooling, similarities and means in float32 (official: the model dtype for pooling and means,
  float32 for the cosines); merged states are written back in the hidden dtype. 2x2 means are
  taken as the mean of the two row means (official `avg_pool2d`: one sum of four), a float
  rounding difference.
- `tau_s: null` and `tau_t: null` switch the spatial / temporal merge off (choice of this harness:
  the official code has no spatial switch and switches the temporal merge off with tau_t <= 0);
  with both off STTM keeps every token (`none`).
- The (h, w) grid of a frame: `PrefillView.grid` when the driver's caller gives it, else a square
  grid of `frame_tokens` (choice of this harness; the official LLaVA code also takes sqrt(N)); a
  non-square grid without `grid` is refused. The merge needs the whole F x h x w grid at layer K
  (no visual stage that dropped tokens in front; refused otherwise) and a pyramid with a level
  `root_level` (a side of at least 2 tokens, official `size_per_level`).
- `weighted_avg`, `sim_per_head` and the slow pairing (official options, off in every preset of
  `run_vidqa.sh`) are not offered.
- `retention=` calibrates tau_t on rho_tok (choice of this harness: tau_s stays at its preset; the
  official scripts set both per benchmark). The merged count depends on the LLM's states entering
  layer K, so calibration prefills [head + video] of each calibration document to layer K once
  (`harness.run.calibrate.layer_states`) and bisects tau_t on those states.
Defaults: K = 2, root level 1, (tau_s, tau_t) = (0.85, 0.65), the LLaVA-OV-7B VideoMME 50 % preset.
Other LLaVA-OV-7B presets (50 % / 30 %): EgoSchema (0.90, 0.60) / (0.85, 0.60); LongVideoBench
(0.90, 0.60) / (0.85, 0.60); MLVU (0.90, 0.55) / (0.85, 0.60); NExT-QA (0.95, 0.65) / (0.90, 0.60);
VNBench (0.90, 0.65) / (0.85, 0.65); VideoMME 30 %: (0.85, 0.55).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import Compressor, RetentionKnob, check_layer, cosine_threshold, knob, layer
from methods.core.decoder import Keep, PrefillView
from methods.core.flops import LLMShape

__all__ = ["STTM", "STTMPolicy", "pyramid_sides", "pool_level", "child_slots", "quadtree_nodes",
           "temporal_pairs", "official_representatives", "temporal_merge", "sttm_merge"]


# ---- the spatial pyramid ------------------------------------------------------------------------------
def pyramid_sides(h: int, w: int) -> list[tuple[int, int]]:
    """The official `size_per_level` of an h x w grid: ceil-halve until a side is 2, coarsest first
    (14x14 -> [(2, 2), (4, 4), (7, 7), (14, 14)])."""
    if min(h, w) < 2:
        raise ValueError(f"sttm: a {h}x{w} token grid has no pyramid (sides of at least 2 are needed)")
    sides = [(h, w)]
    while h != 2 and w != 2:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sides.insert(0, (h, w))
    return sides


def _pairs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one side of n: (first, second, has_second) child index of each of the ceil(n/2)
    parents: pairs (0, 1), (2, 3), ... on an even side; on an odd side the first parent has child 0
    alone, then (1, 2), (3, 4), ... (official `pool_to_even_side_*`)."""
    half = math.ceil(n / 2)
    if n % 2 == 0:
        first = 2 * torch.arange(half)
        return first, first + 1, torch.ones(half, dtype=torch.bool)
    first = torch.cat([torch.zeros(1, dtype=torch.long), 1 + 2 * torch.arange(half - 1)])
    second = torch.cat([torch.zeros(1, dtype=torch.long), 2 + 2 * torch.arange(half - 1)])
    return first, second, torch.arange(half) > 0


def _halve(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Means of consecutive pairs along `dim`; on an odd length the first entry stays alone."""
    if x.shape[dim] % 2:
        return torch.cat([x.narrow(dim, 0, 1), _halve(x.narrow(dim, 1, x.shape[dim] - 1), dim)], dim)
    every = (slice(None),) * dim
    return (x[every + (slice(0, None, 2),)] + x[every + (slice(1, None, 2),)]) / 2


def pool_level(x: torch.Tensor) -> torch.Tensor:
    """(T, h, w, C) -> (T, ceil(h/2), ceil(w/2), C): the official `avgpool_to_even_side_feature` (a
    lone first row / column is kept as it is, or averaged along the other axis only)."""
    return _halve(_halve(x, 1), 2)


def child_slots(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the ceil(h/2) x ceil(w/2) parents of an h x w level: (y, x, valid), each (h', w', 4), the
    child of each slot (top-left, top-right, bottom-left, bottom-right: official offsets [0,0],
    [0,1], [1,0], [1,1]). A slot a lone first row / column does not have is invalid and points at
    child (0, 0), as the official `pool_to_even_side_index_video` (it still counts in the test)."""
    (r1, r2, rh), (c1, c2, ch) = _pairs(h), _pairs(w)
    ys = torch.stack([r1, r1, r2, r2], -1)[:, None, :].expand(-1, len(c1), -1)
    xs = torch.stack([c1, c2, c1, c2], -1)[None, :, :].expand(len(r1), -1, -1)
    valid = torch.stack([torch.ones_like(rh)[:, None] & torch.ones_like(ch)[None, :],
                         torch.ones_like(rh)[:, None] & ch[None, :],
                         rh[:, None] & torch.ones_like(ch)[None, :],
                         rh[:, None] & ch[None, :]], -1)
    return torch.where(valid, ys, 0), torch.where(valid, xs, 0), valid


def _boxes(h: int, w: int, levels: int) -> list[torch.Tensor]:
    """Per level, coarsest first, (h_l, w_l, 4) boxes (y0, x0, y1, x1) on the h x w token grid."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    boxes = [torch.stack([y, x, y + 1, x + 1], -1)]
    for _ in range(levels - 1):
        below = boxes[0]
        (r1, r2, _), (c1, c2, _) = _pairs(below.shape[0]), _pairs(below.shape[1])
        top_left = below[r1][:, c1, :2]
        bottom_right = below[r2][:, c2, 2:]
        boxes.insert(0, torch.cat([top_left, bottom_right], -1))
    return boxes


def quadtree_nodes(video: torch.Tensor, tau_s: float | None, root_level: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, h, w, C) states -> (nodes (M, C) float32, boxes (M, 5) long (t, y0, x0, y1, x1)), ordered
    by t*h*w + y0*w + x0: steps 1-3 of the module docstring. tau_s None: every token is a node."""
    frames, h, w, channels = video.shape
    x = video.float()
    device = x.device
    if tau_s is None:
        t, y, xx = torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")
        boxes = torch.stack([t, y, xx, y + 1, xx + 1], -1).flatten(0, 2).to(device)
        return x.flatten(0, 2), boxes
    sides = pyramid_sides(h, w)
    if not 0 <= root_level < len(sides):
        raise ValueError(f"sttm.root_level={root_level}: a {h}x{w} token grid has pyramid levels "
                         f"0..{len(sides) - 1} ({sides})")
    levels = len(sides) - root_level
    feats = [x]
    for _ in range(levels - 1):
        feats.insert(0, pool_level(feats[0]))
    shapes = [f.shape[1:3] for f in feats]
    boxes = [b.to(device).flatten(0, 1) for b in _boxes(h, w, levels)]  # (h_l * w_l, 4) per level
    rows = [f.reshape(-1, channels) for f in feats]  # (T * h_l * w_l, C) per level
    norms = [r.norm(dim=-1) for r in rows]
    parent = torch.arange(len(rows[0]), device=device)  # flat (t, i, j) at the root level
    emitted, boxes_out = [], []
    for level in range(levels):
        lh, lw = shapes[level]
        t, cell = parent // (lh * lw), parent % (lh * lw)
        if level == levels - 1:
            stop = torch.ones_like(parent, dtype=torch.bool)
        else:
            ch, cw = shapes[level + 1]
            ys, xs, valid = (a.to(device).flatten(0, 1) for a in child_slots(ch, cw))  # (lh * lw, 4)
            child = t[:, None] * (ch * cw) + ys.index_select(0, cell) * cw + xs.index_select(0, cell)  # (P, 4)
            kids = rows[level + 1].index_select(0, child.flatten()).view(len(parent), 4, channels)
            dots = torch.bmm(kids, rows[level].index_select(0, parent)[:, :, None])[..., 0]
            scale = (norms[level + 1].index_select(0, child.flatten()).view(-1, 4)
                     * norms[level].index_select(0, parent)[:, None])
            stop = (dots / scale.clamp(min=1e-8) >= tau_s).all(-1)
        emitted.append(parent[stop])
        boxes_out.append(torch.cat([t[stop, None], boxes[level].index_select(0, cell[stop])], -1))
        if level < levels - 1:
            split = (~stop)[:, None] & valid.index_select(0, cell)  # (P, 4)
            parent = child[split]
    box = torch.cat(boxes_out)
    order = torch.argsort(box[:, 0] * h * w + box[:, 1] * w + box[:, 2])
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=device))
    nodes = torch.empty(len(order), channels, device=device)
    done = 0
    for level, index in enumerate(emitted):  # each level's nodes straight to their place in the order
        nodes.index_copy_(0, rank[done:done + len(index)], rows[level].index_select(0, index))
        done += len(index)
    return nodes, box.index_select(0, order)


# ---- the temporal merge -------------------------------------------------------------------------------
def temporal_pairs(boxes: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, 5) boxes ordered by frame -> (first, second) node indices of every pair of frames t, t+1
    whose boxes contain one another (either way), as the official `get_cross_frame_node_pairs_fast`
    (ordered by frame, then first node, then second node)."""
    device = boxes.device
    t = boxes[:, 0]
    counts = torch.bincount(t, minlength=frames)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    local = torch.arange(len(t), device=device) - starts[t]
    padded = torch.zeros(frames, width, 4, dtype=torch.int16, device=device)  # grid coordinates
    present = torch.zeros(frames, width, dtype=torch.bool, device=device)
    padded[t, local] = boxes[:, 1:].to(torch.int16)
    present[t, local] = True
    diff = padded[:-1, :, None] - padded[1:, None, :]  # (F-1, m, m, 4)
    holds = (diff[..., :2] <= 0).all(-1) & (diff[..., 2:] >= 0).all(-1)
    inside = (diff[..., :2] >= 0).all(-1) & (diff[..., 2:] <= 0).all(-1)
    b, i, j = ((holds | inside) & present[:-1, :, None] & present[1:, None, :]).nonzero().unbind(1)
    return starts.index_select(0, b) + i, starts.index_select(0, b + 1) + j


def official_representatives(first: torch.Tensor, second: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) representative of each node after the official `get_merge_dst_idx_safe` rounds
    (module docstring, step 4; its early stop included)."""
    rep = torch.arange(count, device=first.device)
    while True:
        low = torch.minimum(rep.index_select(0, first), rep.index_select(0, second))
        rep.scatter_reduce_(0, first, low, reduce="amin")
        rep.scatter_reduce_(0, second, low, reduce="amin")
        rep = rep.index_select(0, rep)
        if torch.equal(rep, rep.index_select(0, rep)):
            return rep


def temporal_merge(nodes: torch.Tensor, boxes: torch.Tensor, frames: int, tau_t: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) nodes with their (M, 5) boxes -> the survivors' (nodes (M', C), boxes (M', 5)) in
    order: step 4 of the module docstring. tau_t None: nothing merges."""
    if tau_t is None or frames < 2:
        return nodes, boxes
    first, second = temporal_pairs(boxes, frames)
    scale = nodes.norm(dim=-1) + 1e-8  # the official rows / (norm + 1e-8)
    dots = (nodes.index_select(0, first) * nodes.index_select(0, second)).sum(-1)
    similar = dots / (scale.index_select(0, first) * scale.index_select(0, second)) >= tau_t
    if not bool(similar.any()):
        return nodes, boxes
    rep = official_representatives(first[similar], second[similar], len(nodes))
    alive = rep == torch.arange(len(nodes), device=nodes.device)
    slot = (alive.cumsum(0) - 1).index_select(0, rep)  # each node's survivor, 0..M'-1
    count = int(alive.sum())
    sums = torch.zeros(count, nodes.shape[1], device=nodes.device).index_add_(0, slot, nodes)
    sums /= torch.bincount(slot, minlength=count).to(sums.dtype)[:, None]
    return sums, boxes[alive]


def sttm_merge(video: torch.Tensor, frames: int, grid: tuple[int, int], tau_s: float | None,
               tau_t: float | None, root_level: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(F*h*w, D) video states in frame-major raster order -> (index (M,) of each survivor's
    top-left token, ascending; merged states (M, D) float32)."""
    h, w = grid
    if video.shape[0] != frames * h * w:
        raise ValueError(f"sttm: {video.shape[0]} video states for {frames} frames of {h}x{w} tokens")
    STTM.check_knobs(tau_s=tau_s, tau_t=tau_t, root_level=root_level)
    nodes, boxes = quadtree_nodes(video.view(frames, h, w, -1), tau_s, root_level)
    nodes, boxes = temporal_merge(nodes, boxes, frames, tau_t)
    return boxes[:, 0] * h * w + boxes[:, 1] * w + boxes[:, 2], nodes


# ---- the prefill policy -----------------------------------------------------------------------------
@dataclass
class STTMPolicy:
    """Before layer `layer`, replace the video run by STTM's survivors (positions: compact |
    original | None = by the family's position ids)."""

    layer: int
    tau_s: float | None
    tau_t: float | None
    root_level: int
    positions: str | None
    depth: int = 0  # the LLM's layers (for planned_from_states)

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def grid(self, view: PrefillView) -> tuple[int, int]:
        n = view.frame_tokens
        if view.grid is not None:
            return tuple(view.grid)
        side = math.isqrt(n) if n else 0
        if n is None or side * side != n:
            raise ValueError(f"sttm needs the (h, w) token grid of a frame: {n} tokens per frame is not a "
                             "square and the driver was given no grid")
        return side, side

    def act(self, view: PrefillView) -> Keep | None:
        h, w = self.grid(view)
        video = len(view.video)
        if video % (h * w) or not torch.equal(view.video_index.cpu(), torch.arange(video)):
            raise ValueError(f"sttm needs every token of the frames' {h}x{w} grids at layer {self.layer}: "
                             f"got {video} video tokens (a visual stage in front dropped some)")
        compact = self.positions == "compact" or (self.positions is None and view.positions.dim() == 2)
        if compact and view.positions.dim() != 2:
            raise ValueError("sttm.positions=compact needs 1-D position ids; M-RoPE (Qwen2.5-VL) keeps "
                             "the original ids (positions=original, the official Qwen2-VL path)")
        index, merged = sttm_merge(view.hidden[0, view.video], video // (h * w), (h, w), self.tau_s,
                                   self.tau_t, self.root_level)
        if len(index) == video:
            return None  # nothing merged: the sequence (and its positions) as it is
        return Keep(index, merged.to(view.hidden.dtype), compact=compact)

    def planned(self, video_tokens: int, groups=None) -> None:
        return None  # the merged count depends on the hidden states at layer K: planned_from_states

    def planned_from_states(self, states: torch.Tensor, grid: tuple[int, int], depth: int | None = None) -> list[int]:
        """Video tokens per layer from the video's (V, D) states entering layer K (on the (h, w)
        grid): V before K, the survivors from K on (what calibration measures `retention=` with)."""
        h, w = grid
        index, _ = sttm_merge(states, states.shape[0] // (h * w), grid, self.tau_s, self.tau_t, self.root_level)
        depth = self.depth if depth is None else depth
        return [states.shape[0]] * self.layer + [len(index)] * (depth - self.layer)


@register
@dataclass
class STTM(Compressor):
    """`+method=sttm [method.tau_s=0.85] [method.tau_t=0.65]`."""

    name = "sttm"
    stages = frozenset({"prefill"})
    prefill_reads_question = False  # the merge reads the video hidden states only
    # retention= calibrates tau_t on rho_tok, measured from the LLM's states entering layer K of the
    # calibration videos (harness.run.calibrate.layer_states); tau_s stays as set (choice: the spec's
    # nearest preset is the default 0.85)
    retention_knob = RetentionKnob("tau_t", measure="rho_tok")
    label_knobs = ("tau_s", "tau_t")
    layer: int = layer(2, "the merge acts before this decoder layer (official sa_start_layer_idx; "
                       "2 at any depth)", low=0)
    root_level: int = knob(1, "pyramid level of the quadtree roots (official sa_tree_root_level; "
                           "1: 4x4 on a 14x14 grid)", kind="integer", low=0)
    tau_s: float | None = cosine_threshold(0.85, "a node stands for its box when all 4 children have "
                                           "cosine >= tau_s (official sa_tree_thresh; null: no "
                                           "spatial merge)", optional=True)
    tau_t: float | None = knob(0.65, "nested nodes of consecutive frames merge at cosine >= tau_t "
                               "(official sa_tree_temporal_thresh; null: no temporal merge)",
                               low=0.0, high=1.0, low_open=True, optional=True)
    positions: str | None = knob(None, "compact: layers >= K use ids 0..M-1 (official LLaVA); original: "
                                 "survivors keep their ids (official Qwen2-VL); null: the family's "
                                 "official path", kind="choice", choices=("compact", "original"),
                                 optional=True)

    def prefill_policy(self, llm: LLMShape) -> STTMPolicy:
        check_layer("sttm.layer", self.layer, llm.layers, low=0)
        return STTMPolicy(self.layer, self.tau_s, self.tau_t, self.root_level, self.positions, llm.layers)
