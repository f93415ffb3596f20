"""SparseVLM (v1.5): text raters prune video tokens inside the LLM in three stages, recycling some.

Text tokens relevant to the video (raters) are chosen once from the input embeddings; after each of
three decoder layers the video tokens those raters attend to least are dropped, and the most
attended of the dropped ones are clustered into a few recycled tokens placed after the kept ones.

Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025, arXiv:2410.04417.
Official code followed: Gumpest/SparseVLMs, branch `v1.5` at 734d900 (tag v1.5 d8fa47f plus a
README change): `llava/model/language_model/modelling_sparse_llama.py::LlamaDynamicvitModel.forward`
(raters, stages, recycling, position ids), `LlamaDynamicvitFlashAttention2.forward` (the layer's
attention with `return_logits`, and decode positions from each layer's cache length),
`score.py::attn_postprocess_topk` (the schedule `sparse_token_dict`, `layer_dict` {2, 6, 15}),
`utils.py::cluster_and_merge` (recycled tokens), `llava/model/builder.py` (the layers' attention
module). `main` 26a5f48 runs the same algorithm by default and adds a 96-token preset.
ModelTC/LightCompress 9701d03 `llmc/compression/token_reduction/sparsevlm.py` ports v1.5 and keeps
original position ids.

Algorithm (V video tokens, text = every token after the video run):
1. Raters, once, before layer 0 (the policy also acts there), from the LLM input embeddings E:
   M = softmax over text of E_vid E_txt^T, mean over the video tokens, one score per text token;
   raters = the text tokens scoring above the mean.
2. After each layer l of `layers` (the policy acts before l + 1 with layer l's attention, which
   the official code takes inside layer l: RoPE'd q k^T / sqrt(d), causal, softmax, mean over
   heads, here recomputed from layer l's input): s_v = mean over raters of attention(rater -> v);
   keep the min(k_s, V_cur - 1) video tokens with the highest s_v (stage s of the schedule).
3. Recycling: of the n dropped video tokens, the int(0.3 n) + 1 with the highest s_v, in
   descending s_v; c = int(that / 10) + 1 clusters by DPC-kNN (k = c) on their layer-l outputs;
   cluster token = sum of its members / (count + 1e-6) (official `cluster_and_merge`).
4. New sequence: prefix, kept video tokens (in sequence order), the c cluster tokens (in centre-score
   order), text; V_cur = kept + c: clusters are video tokens for the next stage (`Keep.order`).
5. Positions (`positions` knob; null = compact on 1-D position ids, the official LLaVA code;
   original on M-RoPE ids, LightCompress): compact = the sequence takes the ids 0..n-1 after every
   stage and a decode step at each layer sits at that layer's cache length (official
   `get_usable_length(kv_seq_len, self.layer_idx)`: `decode_positions = "cache"`); original = kept
   tokens keep their ids and a cluster takes its centre's (LightCompress); decoding continues after
   the prompt's last id. Compact departs from this harness's keep-positions rule for in-LLM methods.
Every count depends on V only (k_s, then recycled and cluster counts), so `planned` is exact.

Schedule and retention (`keep`): the official schedules are counts of the 576 LLaVA-1.5 tokens
(`sparse_token_dict`: 192 -> (300, 200, 110), 128 -> (303, 110, 36), 64 -> (66, 30, 17); main adds
96 -> (238, 48, 26)), labelled by the token-layer average T/576 (1/3, 2/9, 1/9, 1/6). Choice of this
harness (the official code knows only these presets, for 576 tokens): `keep` is the prefill-FLOPs
share (methods/core/flops.py, counting the video tokens only, clusters included) the schedule is
sized for: the preset whose label is nearest to `keep` gives the shape, its three fractions k/576
are scaled by one factor, k_s = max(1, round(factor * k/576 * V)), the largest factor whose share
does not exceed `keep`. `retention=r` then bisects keep so that the mean rho_flops with the
calibration prompts' text is r (FLOPs matching, as FastV): the nearest preset to r, scaled to r.
Even keep = 1 drops one token per stage (official min(k, V_cur - 1)): no setting keeps everything.

Deviations and choices:
- Video (as the official `video` branch and LightCompress): the F x N video tokens are one run, the
  raters read the whole prompt after it.
- `layers` null: the official (2, 6, 15) on an LLM of at least 17 layers (LightCompress uses them on
  every model); shallower LLMs (the test models) get round(l*L/32) within [1, L-2] (choice).
- Raters, attention means and the clustering in float32 (official: fp16); no rater above the mean
  (all scores equal) makes every text token a rater (official: an empty mean, NaN).
- Ties (official `topk`: unspecified): scores and cluster centres go to the lower index.
- DPC-kNN: the shared methods/core/clustering.py (seeded 1e-6 noise drawn on the CPU, one draw per
  stage in the recycled tokens' order; matmul distances).
- A prompt with no text after the video has no raters: refused with one line.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from methods import register
from methods.core.base import Compressor, RetentionKnob, fraction, knob, share
from methods.core.clustering import assign_to_centres, density_peaks
from methods.core.decoder import Keep, PrefillView
from methods.core.flops import LLMShape, prefill_flops
from methods.core.select import top_k

__all__ = ["SparseVLM", "SparseVLMPolicy", "PRESETS", "OFFICIAL_LAYERS", "raters", "recycle_counts",
           "stage_counts", "layer_counts", "schedule_for", "recycle", "stage"]

OFFICIAL_TOKENS = 576  # LLaVA-1.5's image tokens, what the official schedules count
PRESETS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17), 96: (238, 48, 26)}
OFFICIAL_LAYERS = (2, 6, 15)  # `pruning_loc`
SCALE_STEPS = 48  # bisection steps of the schedule's factor


# ---- counts -----------------------------------------------------------------------------------------------
def recycle_counts(dropped: int, recycle: float = 0.3, cluster_div: int = 10) -> tuple[int, int]:
    """(recycled tokens, clusters) for `dropped` dropped tokens: int(recycle*n) + 1, int(that/div) + 1
    (official); (0, 0) when nothing was dropped."""
    if dropped <= 0:
        return 0, 0
    recycled = int(dropped * recycle) + 1
    return recycled, int(recycled / cluster_div) + 1


def stage_counts(video: int, schedule, recycle: float = 0.3, cluster_div: int = 10) -> list[tuple[int, int]]:
    """(kept, clusters) after each stage from V video tokens: kept = min(k_s, V_cur - 1), V_cur =
    kept + clusters of the stage before."""
    out, current = [], video
    for k in schedule:
        if current == 0:
            out.append((0, 0))
            continue
        kept = min(k, current - 1)
        clusters = recycle_counts(current - kept, recycle, cluster_div)[1]
        out.append((kept, clusters))
        current = kept + clusters
    return out


def layer_counts(video: int, schedule, layers, depth: int, recycle: float = 0.3, cluster_div: int = 10) -> list[int]:
    """Video tokens each of `depth` layers processes: V up to the first layer of `layers`, then
    kept + clusters of each stage from the layer after its own."""
    after = [k + c for k, c in stage_counts(video, schedule, recycle, cluster_div)]
    counts, current, stages = [], video, dict(zip(layers, after))
    for i in range(depth):
        counts.append(current)
        current = stages.get(i, current)
    return counts


@functools.lru_cache(maxsize=4096)
def schedule_for(keep: float, video: int, shape: LLMShape, layers: tuple[int, ...], recycle: float = 0.3,
                 cluster_div: int = 10) -> tuple[int, ...]:
    """The stage counts (k_1, k_2, k_3) for `keep` (module docstring): the nearest preset's fractions
    scaled by the largest factor whose video-only prefill-FLOPs share is at most `keep`."""
    preset = min(PRESETS, key=lambda p: (abs(p / OFFICIAL_TOKENS - keep), -p))
    fractions = [k / OFFICIAL_TOKENS for k in PRESETS[preset]]
    full = prefill_flops(0, [video] * shape.layers, shape)

    def schedule(factor):
        return tuple(max(1, min(video, round(factor * f * video))) for f in fractions)

    def flops_share(factor):
        return prefill_flops(0, layer_counts(video, schedule(factor), layers, shape.layers, recycle,
                                             cluster_div), shape) / full

    low, high = 0.0, 1.0 / min(fractions)  # at `high` the smallest stage asks for every token
    if flops_share(high) <= keep:
        return schedule(high)
    for _ in range(SCALE_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if flops_share(mid) <= keep else (low, mid)
    return schedule(low)


# ---- the steps ------------------------------------------------------------------------------------------
def raters(video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(v, D) video and (q, D) text input embeddings -> (r,) indices of the rater text tokens: softmax
    over text of the dot products, mean over video, above the mean (every text token if none is)."""
    scores = (video.float() @ text.float().T).softmax(-1).mean(0)
    chosen = (scores > scores.mean()).nonzero().flatten()
    return chosen if len(chosen) else torch.arange(len(scores), device=scores.device)


def recycle(states: torch.Tensor, clusters: int, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, D) recycled states (in descending score order) -> (centres (c,) into them, in centre-score
    order; cluster tokens (c, D) float32 = member sum / (count + 1e-6)), DPC-kNN with k = c."""
    x = states.float()[None]
    peaks = density_peaks(x, clusters, generator)
    centres = top_k(peaks.score, clusters)  # (1, c), descending score
    label = assign_to_centres(peaks.distance, centres)[0]
    sums = torch.zeros(clusters, x.shape[-1], device=x.device).index_add_(0, label, x[0])
    counts = torch.zeros(clusters, device=x.device).index_add_(0, label, torch.ones_like(label, dtype=torch.float32))
    return centres[0], sums / (counts[:, None] + 1e-6)


def stage(scores: torch.Tensor, states: torch.Tensor, k: int, recycle_share: float = 0.3, cluster_div: int = 10,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stage on the V_cur video tokens (scores (v,), layer outputs (v, D)) -> (video (k',)
    indices of the entries that stay, ascending; their states (k', D); order (k',): the places they
    take, `Keep.order`). The cluster tokens take the entries of their centres."""
    current = len(scores)
    kept = top_k(scores, min(k, current - 1)).sort().values
    dropped_mask = torch.ones(current, dtype=torch.bool, device=scores.device)
    dropped_mask[kept] = False
    dropped = dropped_mask.nonzero().flatten()
    recycled_count, clusters = recycle_counts(len(dropped), recycle_share, cluster_div)
    if recycled_count == 0:
        return kept, states[kept], torch.arange(len(kept), device=kept.device)
    recycled = dropped[top_k(scores[dropped], recycled_count)]  # descending score
    centres, merged = recycle(states[recycled], clusters, generator)
    placed = torch.cat([kept, recycled[centres]])  # the sequence order: kept, then clusters
    video, perm = placed.sort()
    hidden = torch.cat([states[kept].float(), merged])[perm]
    return video, hidden, torch.argsort(perm)


# ---- the prefill policy ---------------------------------------------------------------------------------
@dataclass
class SparseVLMPolicy:
    """Raters before layer 0, then a stage before each layer l + 1 of `stage_layers`."""

    stage_layers: tuple[int, ...]
    keep: float
    recycle: float
    cluster_div: int
    positions: str | None
    shape: LLMShape
    seed: int = 0
    _raters: torch.Tensor | None = field(default=None, init=False, repr=False)
    _schedule: tuple | None = field(default=None, init=False, repr=False)
    _stage: int = field(default=0, init=False, repr=False)
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)
    decode_positions: str = field(default="prompt", init=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return (0,) + tuple(l + 1 for l in self.stage_layers)

    def schedule(self, video: int) -> tuple[int, ...]:
        return schedule_for(self.keep, video, self.shape, tuple(self.stage_layers), self.recycle, self.cluster_div)

    def act(self, view: PrefillView) -> Keep | None:
        if view.layer == 0:
            if len(view.query) == 0:
                raise ValueError("sparsevlm needs text after the video to choose its raters")
            self._raters = raters(view.hidden[0, view.video], view.hidden[0, view.query])
            self._schedule = self.schedule(len(view.video))
            self._generator = torch.Generator("cpu").manual_seed(self.seed)
            return None
        k = self._schedule[self._stage]
        self._stage += 1
        if len(view.video) == 0:
            return None
        rows = view.attention(view.query[self._raters])  # layer l's attention, (r, n)
        scores = rows[:, view.video].mean(0)
        video, hidden, order = stage(scores, view.hidden[0, view.video], k, self.recycle, self.cluster_div,
                                     self._generator)
        compact = self.positions == "compact" or (self.positions is None and view.positions.dim() == 2)
        if compact and view.positions.dim() != 2:
            raise ValueError("sparsevlm.positions=compact needs 1-D position ids; M-RoPE (Qwen2.5-VL) keeps "
                             "the original ids (positions=original, as LightCompress)")
        if compact:
            self.decode_positions = "cache"
        return Keep(video, hidden.to(view.hidden.dtype), order=order, compact=compact)

    def planned(self, video_tokens: int, groups=None) -> list[int]:
        return layer_counts(video_tokens, self.schedule(video_tokens), self.stage_layers, self.shape.layers,
                            self.recycle, self.cluster_div)


@register
@dataclass
class SparseVLM(Compressor):
    """`+method=sparsevlm [method.keep=0.3]` or `+method=sparsevlm retention=<r>` (prefill FLOPs)."""

    name = "sparsevlm"
    stages = frozenset({"prefill"})
    # a requested retention sets keep by matching prefill FLOPs (rho_flops)
    retention_knob = RetentionKnob("keep", measure="rho_flops")
    label_knobs = ("keep",)
    layers: list[int] | None = knob(None, "the three layers whose attention ranks (pruning after each; "
                                    "null: official 2, 6, 15, scaled on LLMs under 17 layers)",
                                    kind="layers", low=0, optional=True)
    keep: float = fraction(1 / 3, "prefill-FLOPs share (video tokens only) the schedule is sized for, "
                           "in the shape of the nearest official preset (192/128/96/64 of 576)")
    recycle: float = share(0.3, "share of the dropped tokens recycled (official 0.3)")
    cluster_div: int = knob(10, "recycled tokens per cluster (official 10; at least 2: c <= recycled)", kind="integer",
                            low=2)
    positions: str | None = knob(None, "compact: ids 0..n-1 after each stage, decoding at each layer's "
                                 "cache length (official LLaVA); original: kept ids, a cluster takes its "
                                 "centre's (LightCompress); null: compact on 1-D ids, original on M-RoPE",
                                 kind="choice", choices=("compact", "original"), optional=True)

    def validate(self):
        if self.layers is not None:
            self.layers = list(self.layers)
            if len(self.layers) != 3 or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
                raise ValueError(f"sparsevlm.layers={self.layers}: expected three increasing layer indices")

    def resolved_layers(self, depth: int) -> tuple[int, ...]:
        if self.layers is not None:
            layers = tuple(self.layers)
        elif depth >= OFFICIAL_LAYERS[-1] + 2:
            layers = OFFICIAL_LAYERS
        else:
            shape = LLMShape(1, 1, depth)
            layers = tuple(shape.scaled_layer(l, 32, highest=depth - 2) for l in OFFICIAL_LAYERS)
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"sparsevlm.layers: an LLM of {depth} layers is too shallow for the "
                                 f"official (2, 6, 15) scaled to it ({layers}); give three layers")
        if layers[-1] > depth - 2:
            raise ValueError(f"sparsevlm.layers={list(layers)}: the last stage acts after layer {layers[-1]}; "
                             f"expected a layer in [0, {depth - 2}] for an LLM of {depth} layers")
        return layers

    def prefill_policy(self, llm: LLMShape) -> SparseVLMPolicy:
        return SparseVLMPolicy(self.resolved_layers(llm.layers), self.keep, self.recycle, self.cluster_div,
                               self.positions, llm, self.seed)
