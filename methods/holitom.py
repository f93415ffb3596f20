"""HoliTom: holistic token merging for video LLMs, outside the LLM (visual stage) and inside it.

Visual stage: frames are cut into temporal windows by dynamic programming; positions similar across
a whole window are averaged over time (static), the rest (dynamic) are kept per frame by patch
attention, then density-peak clustering merges the static tokens. Prefill stage: at `llm_layer`,
the video tokens the last prompt token attends to least are merged into their most similar kept ones.

Paper: Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
NeurIPS 2025, arXiv:2505.21334. Official code followed: cokeshao/HoliTom, read at commit e9b2972,
`holitom/llava_arch.py` (visual stage, methods of `LlavaMetaForCausalLM_holitom`: `select_static_windows`,
`get_static_dynamic_features`, `merge_tokens_by_attention_density`, `merge_tokens_by_density`,
`merge_tokens_by_clustering`, `holitom`), `holitom/modeling_qwen2.py` (inner merge:
`Qwen2Model_holitom.forward`), defaults from its README and
`scripts/eval_ov-7b_holitom.sh` (RETAIN_RATIO, T=0.8, BETA=0.6, D=0, K=7, HOLITOM_k=18,
HOLITOM_r=0.5); ModelTC/llmc (read at commit 05eedff0) and ModelTC/LightCompress (read at commit
9701d035) `llmc/compression/token_reduction/holitom.py` are the same algorithm.

Algorithm (visual stage, X (F, N, D), patch scores A (F, N)):
1. sim[t, n] = cos(X[t, n], X[t+1, n]); a window [s, e] gains S(s, e)·(e - s) tokens, S(s, e) = the
   positions with sim > tau between every consecutive pair of its frames. The windows maximise the
   total gain (exact DP of the official loop: strict >, ties to the frame alone, then to the shorter
   window). `window_gains` counts S for every (s, e) in one batched comparison over (F, F, N)
   (cumulative counts of similar pairs); the DP recursion dp[i] = max(dp[i-1], max_s dp[s-1] +
   gain[s, i]) is sequential in i, so `temporal_windows` loops over the F frames, each step one
   vectorised max over its <= F candidate window starts: O(F^2) work in F small tensor ops on an
   (F, F) table (one host transfer), nothing per token.
2. r' = min(r / ((F·N - reduced) / (F·N)), 1) (official expression and rounding).
3. Per window of L frames with S static positions: dynamic budget per frame b = ceil((N - S)·r'),
   d = round(b·dominant_share) by patch score, c = b - d by DPC-kNN on the rest (k = min(knn, c),
   centres in position order, each non-centre to its nearest centre, centre <- beta·centre +
   (1 - beta)·mean(members)); static: the L-frame mean of each static position, DPC-kNN to
   round(S·r') tokens the same way (none kept when that rounds to 0). Frames with L = 1: all dynamic.
4. Output frame-major; each frame's tokens in position order, a window's static tokens in its first
   frame at their positions. Contiguous position ids (a plain (M, D) tensor), as the official code.
Prefill stage (before layer K = llm_layer): the last prompt token's attention at layer K-1 (mean over
heads) keeps k = max(1, round(V·llm_keep)) of the V video tokens; every other video token, in
position order, is folded into the kept token of highest cosine similarity (computed once on the
states entering layer K) by pairwise halving, h_kept <- (h_kept + h_dropped) / 2 (official). The
sequential halving has the closed form 2^-m·h_kept + sum_t 2^-(m-t+1)·h_t over the kept token's m
members in position order, computed in one scatter. Kept tokens keep their positions (the driver).

`retention` is the official RETAIN_RATIO: the visual stage's budget. The visual stage keeps
sum_w [round(S_w·r') + L_w·ceil((N - S_w)·r')] tokens, a little above r·F·N (ceil), except when
the temporal averaging alone already leaves fewer than r·F·N tokens: then r' = 1 and it keeps all
F·N - reduced of them, fewer than r·F·N (official; a mostly still video, such as the smoke clips'
fixed background, lands there). The harness's
rho_tok counts the video tokens at the first LLM layer that prunes, i.e. *after* the inner merge:
with the inner merge on (default) the reported rho_tok is about retention·llm_keep (~12.5 % at
retention=0.25), not retention; rho_avg and rho_flops show the layers before llm_layer at the
visual-stage count. `llm_keep=1` switches the inner merge off (official "HoliTom w/o M"), then
rho_tok ~ retention.

Deviations from the official code, and why:
- Knob `dominant_share` = 1 - official D (D is the official *contextual* share: dominant_num =
  round(ceil(n·r')·(1 - D))), so the official D = 0, i.e. every dynamic token chosen by patch
  score, is dominant_share 1 (choice of this harness): default 1.0, d = round(b·dominant_share)
  (equal to the official count except where b·(1 - D) and b·dominant_share round differently at an
  exact .5 in floating point).
- The official contextual branch (D > 0) cannot run as written: `pos.masked_select(
  mask.unsqueeze(-1))` broadcasts (B, n) against (B, n, 1) and its `.view` fails, so D > 0 is dead
  code at the official defaults; here it does what its code evidently means (positions of the
  non-dominant tokens), the same DPC + beta merge as the static tokens.
- Layout: the official LLaVA-OV path (`mm_newline_position="one_token"`) emits each window as
  [static tokens] + [frame s] + ... + [frame e], each frame dominant-then-contextual. Here the
  official "grid" ordering (the paper's "merge into the first occurrence"): static tokens in the
  window's first frame, every frame sorted by position (choice of this harness: outputs keep
  the original frame-major, row-major order). One newline after the video, as one_token.
- Decisions (similarities, static means, DPC, merges) in float32; official runs them in the model
  dtype (fp16/bf16). Output in the input dtype.
- DPC-kNN: the shared methods/core/clustering.py deviations (seeded 1e-6 noise drawn on the CPU, matmul
  distances, stable ties). Noise draw order: windows in order, per window its dynamic frames'
  contextual clustering (one (L, n) draw) then its static clustering (one (1, S) draw), as the
  official call order.
- Ties (official torch.topk: unspecified): patch-score and attention top-k go to the lower index;
  the inner merge's cosine argmax ties go to the lower-position kept token (official: the earlier
  in attention order).
- No MAX_WINDOW_SIZE: the official default, 1024, exceeds any frame count used here.
- Inner merge: the trailing newline is text in this harness (the driver's video span ends before
  it), so it is never dropped nor a merge target and V counts video tokens only (official V
  includes it). k has a floor of 1 (official round() may give 0, and then fails). Scores and
  cosines in float32 (official: model dtype), merged states written back in the hidden dtype.
  Decode steps do not merge and layers < K keep the full cache, as official.
- "Averaged into its most similar kept token" (the inner merge) does not say with which weights:
  followed the official pairwise halving (later members weigh more), not a plain mean.
- `llm_layer` default None = official 18 of 28 layers scaled to the model's depth:
  round(18·L/28), clamped to [1, L-1] (the 8-layer test model: 5).
- `retention` default 0.25 (the harness's direct-knob default; the official code defaults to 0.1,
  evaluated at 0.10-0.25 with T=0.65 at 0.10 and 0.8 otherwise). tau > 1 is accepted: no position
  is static (temporal merging off; tau = 1 is not enough since a float cosine may exceed 1).
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
    check_layer,
    cosine_threshold,
    fraction,
    knob,
    layer,
    share,
)
from methods.core.clustering import assign_to_centres, density_peaks, merge_into_centres
from methods.core.decoder import Keep, PrefillView
from methods.core.flops import LLMShape
from methods.core.select import kept_count, top_k_ascending
from methods.core.similarity import normalized, same_position_similarity, segment_ids
from methods.topk import pooled_scores

__all__ = ["HoliTom", "HoliTomVisual", "InnerMerge", "holitom_compress",
           "holitom_visual", "inner_merge", "temporal_windows", "window_gains"]

OFFICIAL_LAYER = 18  # HOLITOM_k=18 on the 28-layer LLaVA-OV-7B


# ---- temporal windows ------------------------------------------------------------------------------
def _similar_pairs(above: torch.Tensor) -> torch.Tensor:
    """(F-1, N) bool -> (F, N) int32: run[t, n] = similar pairs (u, u+1) with u < t at position n.
    Position n is similar across frames s..e exactly when run[e, n] - run[s, n] == e - s."""
    run = torch.zeros(above.shape[0] + 1, above.shape[1], dtype=torch.int32, device=above.device)
    run[1:] = above.cumsum(0)
    return run


def window_gains(above: torch.Tensor) -> torch.Tensor:
    """(F-1, N) bool, above[t, n] = sim[t, n] > tau -> (F, F) long gain[s, e] = S(s, e)·(e - s), the
    tokens averaging window [s, e] removes (0 for e <= s); one comparison over every (s, e, n)."""
    run = _similar_pairs(above)
    index = torch.arange(run.shape[0], device=above.device)
    length = index[None, :] - index[:, None]  # [s, e] -> e - s
    static = (run[None, :, :] - run[:, None, :]) == length[:, :, None]
    return static.sum(-1) * length.clamp(min=0)


def temporal_windows(gain: torch.Tensor) -> tuple[list[tuple[int, int]], int]:
    """The official DP over frames on an (F, F) gain table: ([(start, end), ...] inclusive windows
    covering every frame, tokens removed). Ties: the frame alone, then the shorter window."""
    gain = gain.to("cpu", torch.long)
    frames = gain.shape[0]
    best = torch.zeros(frames + 1, dtype=torch.long)  # best[i]: the optimum over frames < i
    start = list(range(frames))
    for i in range(frames):  # sequential in i; the window starts of frame i are one vector op
        best[i + 1] = best[i]
        if i:
            candidates = (best[:i] + gain[:i, i]).flip(0)  # starts i-1, ..., 0: shortest first
            j = int(candidates.argmax())  # the first maximum
            if candidates[j] > best[i]:
                best[i + 1], start[i] = candidates[j], i - 1 - j
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], int(best[frames])


# ---- clustering --------------------------------------------------------------------------------------
def _cluster_merge(tokens: torch.Tensor, clusters: int, knn: int, beta: float,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, C) -> centres (B, clusters) ascending, merged (B, clusters, C) float32: DPC-kNN with
    k = min(knn, clusters); non-centres join their nearest centre; beta-weighted merge."""
    peaks = density_peaks(tokens, min(knn, clusters), generator)
    centres = top_k_ascending(peaks.score, clusters)
    label = assign_to_centres(peaks.distance, centres)
    return centres, merge_into_centres(tokens, label, centres, beta)


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(..., n) bool -> (..., count) indices of the first `count` True entries per row, ascending
    (rows hold at least `count`; no host sync)."""
    return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :count]


# ---- visual stage --------------------------------------------------------------------------------------
@dataclass
class HoliTomVisual:
    tokens: torch.Tensor  # (M, D) in the input dtype
    slots: torch.Tensor  # (M,) ascending: frame * N + position of each token's place
    windows: list[tuple[int, int]]  # inclusive frame windows
    retain: float  # r', the rescaled per-group retention


@torch.no_grad()
def holitom_visual(features: torch.Tensor, scores: torch.Tensor, retention: float, tau: float = 0.8,
                   beta: float = 0.6, dominant_share: float = 1.0, knn: int = 7,
                   generator: torch.Generator | None = None) -> HoliTomVisual:
    """HoliTom's visual stage on pooled features (F, N, D) with per-token patch scores (F, N)."""
    if features.dim() != 3 or scores.shape != features.shape[:2]:
        raise ValueError(f"holitom: expected features (F, N, D) and scores (F, N), got "
                         f"{tuple(features.shape)} and {tuple(scores.shape)}")
    x = features
    frames, n, dim = x.shape
    device = x.device
    scores = scores.to(device=device, dtype=torch.float32)

    # 1-2. windows and the rescaled budget
    above = same_position_similarity(x) > tau  # (F - 1, N)
    windows, reduced = temporal_windows(window_gains(above))
    total = frames * n
    retain = min(retention / ((total - reduced) / total), 1)

    # static positions of every window at once; one host sync for their counts
    run = _similar_pairs(above)
    first = torch.tensor([s for s, _ in windows], device=device)
    last = torch.tensor([e for _, e in windows], device=device)
    static_w = ((run[last] - run[first]) == (last - first)[:, None]) & (last > first)[:, None]
    static_counts = static_w.sum(1).tolist()
    plans = []  # per window: (L, S, b, d, c, static clusters)
    for (s, e), static in zip(windows, static_counts):
        budget = math.ceil((n - static) * retain)
        dominant = round(budget * dominant_share)
        plans.append((e - s + 1, static, budget, dominant, budget - dominant,
                      round(static * retain) if e > s else 0))
    window_of = segment_ids([(s, e + 1) for s, e in windows], device)
    static_f = static_w[window_of]  # (F, N): the static positions of each frame's window
    dominant_f = torch.tensor([p[3] for p in plans for _ in range(p[0])], device=device)

    # 3. dominant: per frame the d best-scored dynamic tokens (ties: lower position)
    by_score = torch.sort(-scores, dim=1, stable=True).indices
    order = by_score.gather(1, torch.sort(static_f.gather(1, by_score).to(torch.uint8), dim=1,
                                          stable=True).indices)  # dynamic by score, then static
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(frames, n))
    dominant = rank < dominant_f[:, None]
    keep = dominant.clone()

    # contextual (dynamic, DPC) and static (DPC) tokens, window by window
    slots, values = [], []
    for w, ((s, e), (length, static, budget, d, c, c_static)) in enumerate(zip(windows, plans)):
        frame_index = torch.arange(s, e + 1, device=device)
        if c > 0:
            rest = ~(static_f[s:e + 1] | dominant[s:e + 1])
            pos = _first_true(rest, n - static - d)  # (L, n - S - d) ascending
            tokens = x.flatten(0, 1).index_select(0, (frame_index[:, None] * n + pos).flatten())
            tokens = tokens.view(length, n - static - d, dim)
            centres, merged = _cluster_merge(tokens, c, knn, beta, generator)
            slots.append((frame_index[:, None] * n + pos.gather(1, centres)).flatten())
            values.append(merged.flatten(0, 1))
        if c_static > 0:
            pos = _first_true(static_w[w], static)  # (S,) ascending
            means = x[s:e + 1, pos].float().mean(0)
            centres, merged = _cluster_merge(means[None], c_static, knn, beta, generator)
            slots.append(s * n + pos[centres[0]])
            values.append(merged[0])
    for extra in slots:
        keep.view(-1)[extra] = True

    # 4. frame-major, position order
    count = sum(length * budget + c_static for length, _, budget, _, _, c_static in plans)
    kept = _first_true(keep.flatten(), count)
    out = x.flatten(0, 1).index_select(0, kept)
    if slots:
        extra = torch.cat(slots)
        out[torch.searchsorted(kept, extra)] = torch.cat(values).to(out.dtype)
    return HoliTomVisual(out, kept, windows, retain)


def holitom_compress(features: torch.Tensor, scores: torch.Tensor, retention: float, tau: float = 0.8,
                     beta: float = 0.6, dominant_share: float = 1.0, knn: int = 7,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(F, N, D) features + (F, N) patch scores -> (M, D) tokens (HoliTom's visual stage)."""
    return holitom_visual(features, scores, retention, tau, beta, dominant_share, knn, generator).tokens


# ---- prefill stage (inner merge) ---------------------------------------------------------------------

def inner_merge(hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(V, D) states, (k,) kept indices ascending -> (k, D) kept states after folding every other
    token, in position order, into its most cosine-similar kept token by pairwise halving."""
    video, k = hidden.shape[0], kept.shape[0]
    h = hidden.float()
    is_kept = torch.zeros(video, dtype=torch.bool, device=h.device)
    is_kept[kept] = True
    dropped = _first_true(~is_kept, video - k)
    units = normalized(h)
    target = (units[dropped] @ units[kept].T).argmax(-1)  # first max: the lower position
    # member t (1-based, position order) of a kept token with m members weighs 2^-(m - t + 1)
    order = torch.sort(target, stable=True).indices
    group = target[order]
    members = torch.zeros(k, dtype=torch.long, device=h.device)
    members.scatter_add_(0, target, torch.ones_like(target))  # (bincount would sync on a GPU)
    rank = torch.arange(video - k, device=h.device) - (members.cumsum(0) - members)[group] + 1
    weight = torch.exp2((rank - members[group] - 1).float())
    merged = torch.exp2(-members.float())[:, None] * h[kept]
    return merged.index_add_(0, group, weight[:, None] * h[dropped[order]])


@dataclass
class InnerMerge:
    """Before layer `layer`, keep the `keep` share of the video tokens by the last prompt token's
    attention at layer-1 and fold the others into them (HoliTom's inner-LLM merge)."""

    layer: int
    keep: float
    depth: int

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def act(self, view: PrefillView) -> Keep | None:
        video = len(view.video)
        count = kept_count(self.keep, video)  # official round(V·(1 - HOLITOM_r)), at least 1
        if count >= video:
            return None
        kept = top_k_ascending(view.attention()[0, view.video], count)
        return Keep(kept, inner_merge(view.hidden[0, view.video], kept))

    def planned(self, video_tokens: int, groups=None) -> list[int]:
        after = min(video_tokens, kept_count(self.keep, video_tokens))
        return [video_tokens] * self.layer + [after] * (self.depth - self.layer)


# ---- the compressor ------------------------------------------------------------------------------------
@register
@dataclass
class HoliTom(Compressor):
    """`+method=holitom retention=0.25 [tau=0.8] [method.llm_keep=0.5]`."""

    name = "holitom"
    stages = frozenset({"visual", "prefill"})
    # retention = the official RETAIN_RATIO (visual-stage budget), set directly; the reported
    # rho_tok is counted after the inner merge (see the module docstring)
    retention_knob = RetentionKnob("retention", measure="rho_tok", direct=True)
    label_knobs = ("retention", "tau", "llm_keep")
    needs = frozenset({"patch_scores"})
    retention: float = fraction(0.25, "visual-stage budget: share of video tokens (official RETAIN_RATIO)")
    tau: float = cosine_threshold(0.8, "a position is static across frames whose cosines exceed tau")
    beta: float = share(0.6, "weight of a cluster centre in its merge")
    dominant_share: float = share(1.0, "share of a frame's dynamic budget kept by attention, not clustered")
    knn: int = knob(7, "neighbours of the density-peak clustering", kind="integer", low=1)
    llm_layer: int | None = layer(None, "the inner merge acts before this layer (null: official 18 of 28, "
                                  "scaled to the LLM's depth)")
    llm_keep: float = fraction(0.5, "share of video tokens kept by the inner merge (1 - official "
                               "HOLITOM_r; 1 switches it off)")

    def compress(self, x: VisualInput) -> torch.Tensor:
        if x.patch_scores is None:
            raise ValueError("holitom needs the vision encoder's patch attention (patch_scores)")
        scores = pooled_scores(x.patch_scores, x.grid, x.patch_grid)
        generator = torch.Generator("cpu").manual_seed(self.seed)  # per video: resumable, shardable
        return holitom_compress(x.features, scores, self.retention, self.tau, self.beta,
                                self.dominant_share, self.knn, generator)

    def prefill_policy(self, llm: LLMShape) -> InnerMerge:
        layer = (llm.scaled_layer(OFFICIAL_LAYER) if self.llm_layer is None
                 else check_layer("holitom.llm_layer", self.llm_layer, llm.layers))
        return InnerMerge(layer, self.llm_keep, llm.layers)
