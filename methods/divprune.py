"""DivPrune: keep the most diverse subset of tokens by greedy max-min selection on cosine distance.

First the token farthest (in cosine distance) from its nearest other token, then repeatedly the
token farthest from everything selected so far, until the budget is reached; the kept tokens are
output unchanged in original order. Over the whole video (scope=video) or per frame (scope=frame).

Paper: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025, arXiv:2503.02175. Official code followed: vbdi/divprune, read at commit 799e2d9,
`LLaVA/llava/model/llava_arch.py` (LLaVA 1.5/1.6), `LlavaMetaForCausalLM.DivPrune`, verbatim as the
`divprune` function of ModelTC/llmc `llmc/compression/token_reduction/divprune.py` (read at commit
05eedff0); it has no LLaVA-OneVision/video version. As the official code: the distance is `1 - cos`
on the post-projector tokens, the first pick is the argmax of each token's smallest distance to the
others, each next one the argmax of the smallest distance to the selected set, `torch.argmax` ties
go to the first (lowest) index, the budget is `round(r * n)` (half to even), the output is the kept
rows in ascending index order and they take consecutive positions (official: spliced into the
sequence, positions renumbered).
scope=video prunes all F*N video tokens at once (the official code prunes all visual tokens of a
sample at once); the single trailing newline is not a candidate and always stays (this harness
counts F*N). scope=frame is this harness's option: each frame keeps `round(r * N)` of its own tokens.

Cost: the greedy loop keeps each candidate's running minimum distance to the selected set, so a
step is one (n,)-vector update with the newly selected token's row of the distance matrix: O(k*n)
after the (n, n) matrix, instead of the official O(k^2*n) re-minimum over all selected rows (the
same numbers: a running min is exact). The loop over the k selections is inherent to the greedy
algorithm; per frame, the frames are one batch. On CPU the whole method costs its floor, the
(n, n) cosine product (benchmarks/bench_divprune.py: 1.0x at 32x196x3584, where the (n, n)
float32 matrix takes 157 MB); computing each step's distances from the features instead (an
(n, D) x (D,) product per pick, no matrix) was 2.4-4x slower there. On a GPU the k steps are
~3 small kernels each without host synchronisation, so launch latency rather than the product may
dominate (not measured here).

Deviations:
- already-selected tokens are masked out of later picks: the official code does not mask them and
  can re-pick one (duplicate index, fewer distinct tokens) once every remaining token duplicates a
  selected one. Here exactly k distinct tokens are kept; otherwise the same picks.
- the first pick uses the minimum over the other tokens (choice of this harness), over both D[i, j]
  and D[j, i]: the most isolated token is often one of a mutually nearest pair, an exact tie in exact
  arithmetic that goes to the lower index (this harness's tie rule); the official code takes the
  second-smallest entry of each column including the self-distance, so the last bit of the (possibly
  asymmetric) product decides that tie, and a self-distance above a near-duplicate's distance changes it.
- a zero token has cosine 0 to every token (distance 1); official: 0/0 = NaN.
- the budget is at least one token (official: round(r * n) may be 0, an empty video).
- float32 (float64 for float64 input) instead of the model's fp16/bf16, which moves near-ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import Compressor, RetentionKnob, VisualInput, fraction, knob
from methods.core.select import kept_count
from methods.core.similarity import checked_features, compute_dtype, unit_rows

__all__ = ["SCOPES", "divprune_budget", "divprune_compress", "divprune_select"]

SCOPES = ("video", "frame")


def divprune_budget(retention: float, n: int) -> int:
    """Tokens kept out of n: `round(r * n)` (Python round, half to even), at least one."""
    return kept_count(retention, n)


@torch.no_grad()
def divprune_select(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n, D) -> (B, k) long: the greedy max-min picks of each batch row, in pick order.

    Vectorised per step: one argmax over the running minima and one running-min update with the
    picked row of the (B, n, n) distance matrix; no host synchronisation.
    """
    batch, n, _ = tokens.shape
    if not 1 <= k <= n:
        raise ValueError(f"divprune: k={k}: expected 1 <= k <= n={n}")
    u = unit_rows(tokens.to(compute_dtype(tokens.dtype)))
    dist = torch.matmul(u, u.mT).neg_().add_(1.0)  # (B, n, n): 1 - cos, the official distance
    del u
    diag = dist.diagonal(dim1=-2, dim2=-1)
    # first pick: the largest smallest distance to the *other* tokens. Row and column minima both:
    # the product may be asymmetric in the last bit, and a mutually nearest pair must tie exactly
    diag.fill_(float("inf"))
    first = torch.minimum(dist.amin(dim=-2), dist.amin(dim=-1)).argmax(dim=-1)  # (B,)
    # from now on the self-distance is -inf: taking a picked token's row into the running minimum
    # masks that token out of every later pick
    diag.fill_(float("-inf"))
    rows = dist.view(batch * n, n)  # row b * n + i: batch b's distances from token i
    offsets = torch.arange(batch, device=dist.device) * n if batch > 1 else None
    # (B, n): each token's smallest distance to the selected set
    nearest = rows.index_select(0, first if offsets is None else first + offsets)
    picks = [first]
    for _ in range(k - 1):
        pick = nearest.argmax(dim=-1)  # first maximum on ties, as torch.argmax in the official code
        picks.append(pick)
        torch.minimum(nearest, rows.index_select(0, pick if offsets is None else pick + offsets), out=nearest)
    return torch.stack(picks, dim=1)


@torch.no_grad()
def divprune_compress(features: torch.Tensor, retention: float = 0.25, scope: str = "video") -> torch.Tensor:
    """(F, N, D) -> (M, D): the kept rows, in original (frame-major) order.

    scope="video": M = max(1, round(r*F*N)) over all tokens; scope="frame": max(1, round(r*N)) per frame.
    """
    DivPrune.check_knobs(retention=retention, scope=scope)
    checked_features(features)
    frames, per_frame, dim = features.shape
    flat = features.reshape(frames * per_frame, dim)
    if scope == "video":
        keep = divprune_select(flat[None], divprune_budget(retention, frames * per_frame))[0]
        index = keep.sort().values
    else:
        keep = divprune_select(features, divprune_budget(retention, per_frame)).sort(dim=1).values
        offsets = torch.arange(frames, device=features.device)[:, None] * per_frame
        index = (keep + offsets).flatten()
    return flat.index_select(0, index)


@register
@dataclass
class DivPrune(Compressor):
    """`+method=divprune retention=0.25 [method.scope=frame]`."""

    name = "divprune"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    retention: float = fraction(0.25, "share of video tokens kept")
    scope: str = knob("video", "select over the whole video or per frame", kind="choice", choices=SCOPES)

    def compress(self, x: VisualInput) -> torch.Tensor:
        return divprune_compress(x.features, self.retention, self.scope)
