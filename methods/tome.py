"""ToMe: Token Merging inside the vision encoder.

In every encoder layer, between attention and MLP, the r most similar pairs of patch tokens (bipartite
soft matching on the layer's keys) merge into their size-weighted mean; later layers' attention adds
log(size) to its logits, so a merged token weighs as the patches it stands for.

Paper: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv:2210.09461. Official code
followed: facebookresearch/ToMe at commit af95e4b (2023-03-30): `tome/merge.py::{bipartite_soft_matching,
merge_wavg, merge_source}`, `tome/patch/timm.py::{ToMeBlock.forward, ToMeAttention.forward,
apply_patch}`, `tome/utils.py::parse_r`. Its port to a VLM's vision tower, read for the placement:
ModelTC/LightCompress at commit 9701d03, `llmc/compression/token_reduction/tome.py`
(`tome_CLIPEncoderLayer_forward` on LLaVA-1.5's CLIP; `configs/sparsification/methods/ToMe/tome.yml`:
r = 16).

Per frame, in each encoder layer the model uses (26 SigLIP layers on LLaVA-OneVision), after attention
+ residual and before the MLP (`ToMeBlock.forward`):
1. metric = the layer's keys, mean over heads (`ToMeAttention.forward` returns k.mean(1)), L2-normalised;
2. A = the tokens at even positions, B = the odd ones; r_l <- min(r_l, floor((t - protected) / 2));
   each a in A finds its most similar b (cosine);
3. the r_l A-tokens with the highest similarity merge into their b: x_b <- sum size*x / sum size,
   size_b <- sum size (`merge_wavg`; sizes start at 1);
4. new order = [unmerged A, in descending-similarity order] + [B, in order] (official: this order sets
   the next layer's A/B split; the unmerged part is re-sorted only when there is a class token);
5. prop_attn: later layers add log(size_key) to the attention logits (`ToMeAttention.forward`; the
   adapter gives it to SDPA as a float bias, so the fused kernel still runs).
LightCompress drops the size tracking of 3 and the bias of 5; the official ToMe is followed.

Choices of this harness, and deviations from the official code:
- retention sets the schedule (choice of this harness): k = max(1, round(retention * N)) tokens per
  frame, N the tokens per frame the model gives the LLM without ToMe (`VisionShape.tokens`:
  LLaVA-OneVision's 196 pooled tokens, the micro model's 64), M = P - k merges over the L layers (P
  patches: 729), r_l = floor(M/L) + [l < M mod L], each capped at floor(t_l / 2) as the matching caps
  it. A capped merge is not moved to another layer, so the last layers' caps leave more than k where a
  layer cannot halve what is left: on SigLIP's 26 layers below k = 27 (retention 0.1 gives 24 tokens
  per frame, 0.05 gives 19), and on a shallow encoder, which cannot go below about P / 2^L (the 2-layer
  smoke model: 195 of 196 at retention 0.25; the 2-layer micro model: never below its 64 pooled tokens,
  72 at retention 0.5, so rho_tok > 1 there). The achieved k is reported (`notes()`:
  tome_tokens_per_frame) and in rho_tok. The official knob `r` (with `inflection`: parse_r's
  (r, inflection) form) sets the merges per layer instead (then retention=null); parse_r's list form is
  open to the pure functions only.
- LLaVA-OneVision (choice of this harness): merged tokens are off the 27x27 grid, so the 2x2 bilinear
  pooling is skipped; each frame's k tokens go through the projector to the LLM, ordered by the smallest
  original patch index among their sources, at consecutive positions (the standard concatenation). Even
  retention 1 differs from `none` (196 merged tokens instead of 196 bilinear ones). The features' grid
  is (1, k): merged tokens have no 2-D grid. Where no layer merges (r = 0) the tokens are still the
  grid and are pooled as the model does: the run equals `none` exactly (tests/test_tome.py).
- a token's sources are tracked as its smallest original patch index (merged with "amin"), all the order
  needs; `merge_source` (the official (B, t, P) adjacency) gives the same first patch (tested).
- ties: torch.argmax (the first index) for each A-token's best B, and a stable descending sort of the
  similarities (the lower index first); the official torch.max / argsort leave tie order to the backend.
- decisions in float32 (float64 for float64 input): the normalised keys, their similarities; sizes in that
  dtype too (exact integers), the weighted mean taken in it and cast back to the activations' dtype
  (official: all in the activations' dtype). A zero key has cosine 0 to every key (official: 0/0 = NaN).
- parse_r for a one-layer encoder gives [r] (official: a division by zero).
- class_token=false: SigLIP has no CLS token (true protects token 0 as the official code protects a CLS
  token). The distillation token (DeiT) is not carried.
- Qwen2.5-VL: not defined (its window attention and 2x2 patch merger need the full grid); refused before
  the model loads.
- cost: the adapter's vision FLOPs count each layer at its planned tokens (attention at t_l, MLP at
  t_l - r_l, the projector on k); ToMe's own matching (a (t/2) x (t/2) product per layer) is in the
  measured vision time, not in FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import Compressor, EncoderPolicy, RetentionKnob, fraction, knob
from methods.core.flops import VisionShape
from methods.core.select import kept_count
from methods.core.similarity import compute_dtype, unit_rows

__all__ = ["ToMe", "ToMePolicy", "bipartite_soft_matching", "merge_source", "merge_wavg", "merges_for",
           "parse_r", "planned_tokens"]


def do_nothing(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False) -> Callable:
    """(B, t, c) metric -> merge(x (B, t, C), mode) -> (B, t - r', C), r' = min(r, floor((t - protected)/2)).

    As the official function (without its distillation token and its unmerge): A = even positions,
    B = odd ones, each a's most similar b, the r' best-matched a's merged into their b with `mode` (a
    scatter_reduce: "sum", "mean", "amax", "amin"); output [unmerged A (descending similarity), B].
    """
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return do_nothing

    with torch.no_grad():
        metric = unit_rows(metric.to(compute_dtype(metric.dtype)))
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.amax(dim=-1), scores.argmax(dim=-1)  # first index on ties
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # unmerged A-tokens
        src_idx = edge_idx[..., :r, :]  # merged A-tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:  # the class token first
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor | None = None):
    """The size-weighted mean merge: (merged x in x's dtype, merged sizes (B, t', 1) in the compute dtype)."""
    if size is None:
        size = torch.ones(*x.shape[:-1], 1, dtype=compute_dtype(x.dtype), device=x.device)
    merged = merge(x.to(size.dtype) * size, mode="sum")
    size = merge(size, mode="sum")
    return (merged / size).to(x.dtype), size


def merge_source(merge: Callable, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """The official source tracking: (B, t', P) adjacency between the current tokens and the P initial
    ones (`x` gives the batch and P when `source` is None)."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


def parse_r(num_layers: int, r) -> list[int]:
    """The official schedule of merges per layer: an int (constant), (r, inflection) (inflection in
    [-1, 1]: -1 decreasing, 0 constant, +1 increasing), or a list (padded with zeros)."""
    inflect = 0.0
    if isinstance(r, list):
        return list(r) + [0] * max(0, num_layers - len(r))
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    if num_layers == 1:
        return [min_val]
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def merges_for(retention: float, patches: int, layers: int, frame_tokens: int) -> list[int]:
    """Merges per layer for k = max(1, round(retention * frame_tokens)) tokens per frame (frame_tokens:
    what the model gives the LLM per frame without ToMe, 196 on LLaVA-OneVision): M = patches - k spread
    as floor(M/L) + [l < M mod L] (before the matching's cap)."""
    k = kept_count(retention, frame_tokens)
    total = max(0, patches - k)
    return [total // layers + (1 if layer < total % layers else 0) for layer in range(layers)]


def planned_tokens(merges: list[int], patches: int, class_token: bool = False):
    """(merges actually made per layer, [(tokens at the attention, tokens at the MLP)] per layer): each
    r_l capped at floor((t_l - protected) / 2), as `bipartite_soft_matching` caps it."""
    protected = 1 if class_token else 0
    t, made, tokens = patches, [], []
    for r in merges:
        r = max(0, min(r, (t - protected) // 2))
        made.append(r)
        tokens.append((t, t - r))
        t -= r
    return made, tokens


class ToMePolicy(EncoderPolicy):
    """ToMe in one pass of a batch of frames through the encoder (methods.core.base.EncoderPolicy)."""

    def __init__(self, merges: list[int], patches: int, prop_attn: bool = True, class_token: bool = False):
        self.merges, self.layer_tokens = planned_tokens(merges, patches, class_token)
        self.merging = any(self.merges)  # False: the tokens stay the patch grid (the adapter pools them)
        self.prop_attn, self.class_token = prop_attn, class_token
        self.size: torch.Tensor | None = None
        self.origin: torch.Tensor | None = None

    def start(self, hidden: torch.Tensor) -> None:
        batch, t, _ = hidden.shape
        self.size = None  # official: no size (no bias) until the first merge
        self.origin = torch.arange(t, device=hidden.device).expand(batch, t)[..., None]

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.prop_attn or self.size is None:
            return None
        return self.size.log()[:, None, None, :, 0].to(dtype)

    def act(self, layer: int, hidden: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        r = self.merges[layer] if layer < len(self.merges) else 0
        if r <= 0:
            return hidden
        merge = bipartite_soft_matching(metric, r, self.class_token)
        self.origin = merge(self.origin, mode="amin")
        hidden, self.size = merge_wavg(merge, hidden, self.size)
        return hidden

    def finish(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        origin = self.origin[..., 0]
        order = origin.argsort(dim=-1)  # the smallest original patch of each token: unique
        return hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1])), origin.gather(1, order)


@register
@dataclass
class ToMe(Compressor):
    """`+method=tome retention=0.25` | `+method=tome method.retention=null method.r=16`."""

    name = "tome"
    stages = frozenset({"encoder"})
    retention_knob = RetentionKnob("retention", direct=True)
    label_knobs = ("retention", "r", "inflection")
    retention: float | None = fraction(0.25, "share of the model's N tokens per frame kept (N = 196 "
                                       "on LLaVA-OneVision): k = round(N r) merged tokens per frame; null: the "
                                       "merges per layer are r", optional=True)
    r: int | None = knob(None, "the official knob: merges per layer (parse_r), instead of retention",
                         kind="integer", low=0, optional=True)
    inflection: float | None = knob(None, "with r: parse_r's (r, inflection) schedule, -1 decreasing, 0 "
                                    "constant, +1 increasing; null: r alone (constant)", low=-1.0, high=1.0,
                                    optional=True)
    prop_attn: bool = knob(True, "add log(size) to later layers' attention logits (official default for "
                           "off-the-shelf models)", kind="choice", choices=(True, False))
    class_token: bool = knob(False, "protect token 0 from merging (SigLIP has no CLS token)", kind="choice",
                             choices=(False, True))

    def validate(self) -> None:
        if (self.retention is None) == (self.r is None):
            raise ValueError(f"tome: retention={self.retention} and r={self.r}: give exactly one of them "
                             "(retention: k tokens per frame; r: the official merges per layer; set the "
                             "other to null)")
        if self.r is None and self.inflection is not None:
            raise ValueError(f"tome.inflection={self.inflection}: it shapes the schedule of r; give r too")

    def schedule(self, vision: VisionShape) -> list[int]:
        """Merges per layer before the matching's cap."""
        if self.r is not None:
            return parse_r(vision.layers, self.r if self.inflection is None else (self.r, self.inflection))
        return merges_for(self.retention, vision.patches, vision.layers, vision.tokens)

    def encoder_policy(self, vision: VisionShape) -> ToMePolicy:
        policy = ToMePolicy(self.schedule(vision), vision.patches, self.prop_attn, self.class_token)
        # what notes() reports: the tokens per frame the LLM gets (without merges, the model's own)
        self._planned = (policy.layer_tokens[-1][1] if policy.merging else vision.tokens, list(policy.merges))
        return policy

    def notes(self) -> dict:
        """The plan on the model's encoder, once the harness has given it (`encoder_policy`)."""
        planned = getattr(self, "_planned", None)
        if planned is None:
            return {}
        return {"tome_tokens_per_frame": planned[0], "tome_merges": planned[1]}
