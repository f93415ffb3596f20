"""A deliberately literal, slow restatement of DyCoke (Tao et al., CVPR 2025, arXiv:2411.15024).

For tests and benchmarks only; it does not import methods/dycoke.py. Python loops over frames and
positions, cosines in float64 from Python floats, selections by sorting (value, index) pairs.

Visual stage, step by step, with this harness's choices (methods/dycoke.py): keep = int((1-K)*N);
for the pairs (0,1), (2,3), ...: the odd frame keeps its `keep` tokens least similar to the token
at the same position of the even frame; then for (0,2), (4,6), ... (the last window included):
frame i+2 keeps its `keep` tokens least similar to frame i (original frames). Kept tokens in grid
order, frames in order, frames without a partner whole. Ties: the lower position first.

Decode stage: `ReferenceSelection` keeps the selection (a sorted list of video indices) and the
attention of the step that made it, and re-selects the top int(V*(1-P)) (ties: lower index) when
cos(this step, that step) < threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def literal_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / max(na * nb, 1e-12) if na > 0 and nb > 0 else 0.0


@dataclass
class TTMResult:
    output: torch.Tensor  # (M, D) float64
    kept: list[list[int]]  # per frame, the kept positions in grid order
    margin: float  # smallest gap between the last kept and the first dropped similarity (inf: none)


def reference_ttm(features: torch.Tensor, merge_ratio: float) -> TTMResult:
    """(F, N, D) -> the TTM output (as methods/dycoke.py states it), literally."""
    x = features.double().tolist()
    frames, per_frame = len(x), len(x[0])
    keep = int((1 - merge_ratio) * per_frame)
    kept = [list(range(per_frame)) for _ in range(frames)]
    margin = math.inf

    def reduce(frame: int, partner: int) -> None:
        nonlocal margin
        sims = [literal_cosine(x[frame][n], x[partner][n]) for n in range(per_frame)]
        order = sorted(range(per_frame), key=lambda n: (sims[n], n))  # least similar first
        if 0 < keep < per_frame:
            margin = min(margin, sims[order[keep]] - sims[order[keep - 1]])
        kept[frame] = sorted(order[:keep])

    for i in range(0, frames, 2):  # stage 1: (0,1), (2,3), ...
        if i + 1 < frames:
            reduce(i + 1, i)
    for i in range(0, frames, 4):  # stage 2: (0,2), (4,6), ... on the original frames
        if i + 2 < frames:
            reduce(i + 2, i)
    rows = [x[f][n] for f in range(frames) for n in kept[f]]
    output = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(x[0][0]))
    return TTMResult(output, kept, margin)


@dataclass
class ReferenceSelection:
    """The decode-stage selection over V video entries, one `step` per generated token."""

    prune_ratio: float
    threshold: float
    selected: list[int] | None = None
    anchor: list[float] | None = None
    history: list[bool] = field(default_factory=list)  # re-selected at each step
    margins: list[float] = field(default_factory=list)  # top-k gap of each re-selection
    cosines: list[float] = field(default_factory=list)  # cos(step, anchor) of each later step

    def step(self, attention) -> list[int]:
        a = [float(v) for v in attention]
        keep = int(len(a) * (1 - self.prune_ratio))
        again = self.selected is None
        if not again:
            c = literal_cosine(a, self.anchor)
            self.cosines.append(c)
            again = c < self.threshold
        if again:
            order = sorted(range(len(a)), key=lambda i: (-a[i], i))
            if 0 < keep < len(a):
                self.margins.append(a[order[keep - 1]] - a[order[keep]])
            self.selected, self.anchor = sorted(order[:keep]), a
        self.history.append(again)
        return self.selected
