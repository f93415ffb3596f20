"""DyCoke: merge temporally redundant tokens before the LLM, then prune the KV cache while decoding.

Visual stage (TTM): each frame that is not a multiple of 4 keeps only its tokens least similar to
the same position of a partner frame. Decode stage: at every generated token, layers >= L attend
only to the video entries the token attended to most at layer L-1, re-chosen when attention drifts.

Paper: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models",
CVPR 2025, arXiv:2411.15024. Official code: KD-TAO/DyCoke, read at commit dd74634,
`llava/model/llava_arch.py` (`dycole_ttm`), `llava/model/language_model/modeling_qwen2.py`
(`PrunableDynamicCache.dycoke_pruning`, `update_cache`, the layer loop of `Qwen2Model.forward`),
`llava/model/language_model/llava_qwen.py` (`init_dycoke`, `DycokeConfigs`) and
`lmms_eval/models/llava_onevision.py` (defaults).

Visual stage: with keep = int((1 - K) * N) (N = 196 tokens per frame; K = 0.7 gives 58),
odd frame 2j+1 keeps its `keep` tokens least similar (cosine, same grid position) to frame 2j;
frame i+2 (i = 0, 4, 8, ...) keeps its `keep` tokens least similar to frame i. Frames 0, 4, 8, ...
keep all N. The output is the tokens in frame order, each frame's kept tokens in grid order, at
contiguous positions (as the official code, which renumbers positions like every LLaVA input).
With F odd, the last frame has no stage-1 partner but, when F-1 = 2 (mod 4), it is still the
"i+2" of the stage-2 window (F-3, F-1), so it is reduced against frame F-3 (choice of this harness:
every window (i, i+2) with i = 0 (mod 4) and i+2 < F; only frames 0 (mod 4) have no partner at all).

Decode stage: a DecodePolicy at layer L. At each decode step it takes the current token's
attention at layer L-1 (mean over heads, over the layer's whole cache + itself, not renormalised)
restricted to the V video entries; if there is no selection yet or cos(this attention, the
attention of the step that made the selection) < reprune_threshold, it selects the top
int(V * (1 - P)) entries (ties: lower index) and remembers this step's attention; otherwise it
reuses the selection. Layers >= L attend to the selected video entries, every text entry and the
generated tokens; the cache is masked, not truncated. Layers < L see everything. The state lives
in the policy, fresh per generation. The driver records the share of video entries attended per
step (int(V(1-P))/V), which the harness reports as `rho_decode_kv`. The selection indexes layer
L's video entries with layer L-1's attention, so at its first step the policy checks that the two
layers cache the same entries: in a pipeline whose prefill stage acts exactly at L they do not,
and that is an error (any other prefill layer is fine).

Deviations from the official code:
- stage 1 compares frame 2j+1 with frame 2j, as the official code at dd74634 (`similarities[i // 2]`,
  since commit 35cc532); the first commit 26dc6f4 indexed the similarities with `(i-2)//2`, so each
  odd frame was pruned by the previous pair's similarity (pair 0 by the last's).
- the last stage-2 window is included (choice of this harness): the official `range(0, F-4, 4)`
  skips (F-4, F-2) when F = 0 (mod 4) (F = 32: 2960 video tokens here, 3098 officially).
- kept tokens in grid order (choice of this harness: outputs keep the frame-major, row-major
  order); the official `topk(..., largest=False)` emits them most-dissimilar first. Ties: stable,
  lower index first (official `torch.topk` ties are unspecified).
- frames without a partner keep all tokens (choice of this harness); the official code drops the
  last frame of an odd F and fails for F <= 4 (empty stage-2 list) and F = 1.
- the decode selection is reused while cos(this step, the selecting step) >= threshold (choice of
  this harness); the official code compares with the previous step, and on "similar" steps does not
  prune at all (its `kv_cache` was reset to None at layer 0), pruning only on steps where attention
  changed. Moreover, before commit 8df4296 the official decode stage never ran: `Qwen2Model.forward`
  reads `self.dycoke` of the inner model, which `init_dycoke` did not set (KD-TAO/DyCoke issue #6);
  8df4296 sets it in `init_dycoke` and `generate`.
- the video span is the true one from the harness (V entries); the official span starts at a
  hard-coded index 14 and has V-1 entries (the last video token is always kept).
- the selection state is per generation; the official `attention_score` is never reset between
  samples (the next sample's first step compares with the previous sample's last).
- similarities and attention are computed in float32 (official: the model dtype, fp16).
- layer default: the official L = 3 of 28 layers (LLaVA-OV-7B), scaled to the model's depth as
  round(3 * depth / 28), at least 1 and below the depth, when `layer` is left unset (None); the
  decision uses layer L-1's attention as the official code (rather than layer L's own).
- defaults K = 0.7, L = 3, P = 0.7 are this harness's choice (= the official README example); the
  official `eval.sh` runs the wrapper's P = 0.8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods import register
from methods.core.base import (
    Compressor,
    RetentionKnob,
    VisualInput,
    check_layer,
    cosine_threshold,
    layer,
    share,
)
from methods.core.decoder import DecodeView
from methods.core.flops import LLMShape
from methods.core.select import top_k_ascending
from methods.core.similarity import cosine

__all__ = ["DyCoke", "DynamicKVSelection", "decode_layer", "dycoke_merge", "kept_per_frame",
           "merged_count", "select_video_entries"]

OFFICIAL_LAYER = 3  # dycoke_l=3 on the 28-layer LLaVA-OV-7B


# ---- visual stage: temporal token merging ---------------------------------------------------------
def kept_per_frame(merge_ratio: float, per_frame: int) -> int:
    """Tokens a reduced frame keeps: int((1 - K) * N), the official expression (K=0.7: 58 of 196)."""
    return int((1 - merge_ratio) * per_frame)


def merged_count(frames: int, per_frame: int, merge_ratio: float) -> int:
    """Video tokens after TTM: frames 0 (mod 4) keep N, every other frame int((1 - K) * N)."""
    full = (frames + 3) // 4
    return full * per_frame + (frames - full) * kept_per_frame(merge_ratio, per_frame)


@torch.no_grad()
def dycoke_merge(features: torch.Tensor, merge_ratio: float) -> torch.Tensor:
    """(F, N, D) video tokens -> (M, D): DyCoke's temporal token merging (see the module docstring).

    Decisions in float32, output in the input's dtype; no host synchronisation.
    """
    frames, per_frame, dim = features.shape
    flat = features.reshape(frames * per_frame, dim)
    keep = kept_per_frame(merge_ratio, per_frame)
    if keep == per_frame or frames < 2:
        return flat
    # stage 1: frame 2j+1 against frame 2j; stage 2: frame 4j+2 against frame 4j (same positions)
    odd, two = frames // 2, (frames + 1) // 4
    sims = torch.cat([cosine(features[1::2], features[0::2][:odd]),
                      cosine(features[2::4], features[0::4][:two])])  # (R, N)
    device = features.device
    reduced = torch.cat([torch.arange(1, frames, 2, device=device),
                         torch.arange(2, frames, 4, device=device)])  # the rows of `sims`
    kept = top_k_ascending(-sims, keep)  # the least similar, ties to the lower index
    mask = torch.ones(frames, per_frame, dtype=torch.bool, device=device)
    mask[reduced] = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, kept, True)
    # kept flat indices in order: a stable sort puts the True entries first (no size-dependent sync)
    index = torch.sort((~mask).flatten().to(torch.uint8), stable=True).indices
    return flat[index[:merged_count(frames, per_frame, merge_ratio)]]


# ---- decode stage: dynamic KV selection -----------------------------------------------------------
def select_video_entries(attention: torch.Tensor, keep: int, selected: torch.Tensor | None,
                         anchor: torch.Tensor | None, threshold: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of DyCoke's selection over V video entries.

    attention (V,): this step's attention over the video entries; selected (V,) bool and anchor
    (V,): the current selection and the attention of the step that made it (None at the first
    step). Returns (selected, anchor, reselected): the top `keep` entries of this step's attention
    (ties: lower index) when there was no selection or cos(attention, anchor) < threshold, else the
    old selection unchanged; `reselected` is a 0-d bool tensor. Branch-free: no host sync.
    """
    attention = attention.float()
    fresh = torch.zeros_like(attention, dtype=torch.bool)
    fresh[top_k_ascending(attention, keep)] = True
    if selected is None:
        return fresh, attention, torch.ones((), dtype=torch.bool, device=attention.device)
    reselect = cosine(attention, anchor) < threshold
    return torch.where(reselect, fresh, selected), torch.where(reselect, attention, anchor), reselect


def decode_layer(layer: int | None, depth: int) -> int:
    """The layer the selection applies from: `layer`, or the official 3 of 28 scaled to `depth`."""
    if layer is None:
        return LLMShape(0, 0, depth).scaled_layer(OFFICIAL_LAYER)
    return check_layer("dycoke.layer", layer, depth)


@dataclass
class DynamicKVSelection:
    """DyCoke's decode policy (one per generation): before layer `layer` at every decode step, the
    video entries that layers >= `layer` attend to, from layer `layer - 1`'s attention."""

    layer: int
    prune_ratio: float
    threshold: float
    selected: torch.Tensor | None = None  # (V,) bool: the current selection
    anchor: torch.Tensor | None = None  # (V,) the video attention of the step that made it
    reselected: list = field(default_factory=list)  # a 0-d bool tensor per step (for inspection)

    def select(self, view: DecodeView) -> torch.Tensor | None:
        videos = len(view.video)
        keep = int(videos * (1 - self.prune_ratio))
        if keep == videos:  # nothing to hide (prune_ratio 0, or no video entries)
            return None
        attention = view.attention(layer=self.layer - 1)
        if self.selected is None and attention.shape[0] != view.attention().shape[0]:
            # only a prefill stage acting exactly at `layer` (in a pipeline) can do this
            raise ValueError(f"dycoke: layers {self.layer - 1} and {self.layer} cache different "
                             "entries (a prefill stage acts at dycoke.layer); choose another layer")
        self.selected, self.anchor, again = select_video_entries(
            attention[view.video], keep, self.selected, self.anchor, self.threshold)
        self.reselected.append(again)
        return self.selected


# ---- the compressor -------------------------------------------------------------------------------
@register
@dataclass
class DyCoke(Compressor):
    """`+method=dycoke [method.merge_ratio=0.7 method.prune_ratio=0.7 method.layer=3]`, or
    `retention=r` to calibrate merge_ratio to a visual-stage token retention."""

    name = "dycoke"
    stages = frozenset({"visual", "decode"})
    # retention sets K (the visual stage's token retention falls as K rises); P stays as given
    retention_knob = RetentionKnob("merge_ratio", measure="rho_tok", increasing=False)
    label_knobs = ("merge_ratio", "prune_ratio")
    merge_ratio: float = share(0.7, "K: share of a reduced frame's tokens merged away")
    layer: int | None = layer(None, "L: decode layers from L on attend to the selected video entries "
                              "(null: the official 3 of 28, scaled to the model's depth)")
    prune_ratio: float = share(0.7, "P: share of the video KV entries hidden while decoding")
    reprune_threshold: float = cosine_threshold(0.9, "reselect when the attention's cosine to the "
                                                "selecting step's falls below this")

    def compress(self, x: VisualInput) -> torch.Tensor:
        return dycoke_merge(x.features, self.merge_ratio)

    def decode_policy(self, llm: LLMShape) -> DynamicKVSelection:
        return DynamicKVSelection(decode_layer(self.layer, llm.layers), self.prune_ratio,
                                  self.reprune_threshold)
