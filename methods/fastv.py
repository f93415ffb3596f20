"""FastV: prune video tokens inside the LLM, by the attention the last prompt token pays them.

Spec: shared/spec/methods.md ("FastV"); retention and FLOPs: shared/spec/measurement.md.
Official code: pkunlp-icler/FastV (`src/FastV/inplace/fastv_inplace.py`); the spec's KV-cache rule
(layers >= K cache only the kept tokens, at their original positions) fixes its known cache bug.

A prefill policy of the shared decoder driver (`methods.decoder`): before layer K it takes one row
of attention at layer K-1 (the last position over every position, recomputed from that layer's
input so the model keeps its SDPA kernel), keeps the k = max(1, round(keep*V)) video tokens it
attends to most (ties: lower index) plus every text token, and layers K..L-1 run on that shorter
sequence. The driver keeps original position ids and per-layer caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from methods import register
from methods.base import Compressor, RetentionKnob, check_int, check_range
from methods.decoder import Keep, PrefillView
from methods.flops import LLMShape
from methods.select import top_k_ascending


def kept_count(keep: float, video_tokens: int) -> int:
    return max(1, round(keep * video_tokens))


def iterative_counts(keep: float, video_tokens: int, stages: int) -> list[int]:
    """Video tokens kept after each stage when every stage keeps `keep` of those that reached it,
    max(1, round(keep*current)) (FastV has one stage)."""
    counts, current = [], video_tokens
    for _ in range(stages):
        current = kept_count(keep, current)
        counts.append(current)
    return counts


@dataclass
class PruneByLastToken:
    """Before each layer in `layers`, keep some of the video tokens that reached it, ranked by the
    last prompt token's attention (ties: lower index).

    counts(keep, video_tokens, stages) gives the tokens kept after each stage from the video
    tokens entering the first one. own_layer: rank with the attention of the layer the policy
    precedes (PyramidDrop), not of the layer before it (FastV). A fresh policy per prefill: the
    driver calls it once per layer of `layers`, in order.
    """

    layers: tuple[int, ...]
    keep: float
    depth: int
    counts: Callable[[float, int, int], list[int]] = iterative_counts
    own_layer: bool = False
    _entering: int = field(default=0, init=False, repr=False)  # video tokens at the first stage
    _stage: int = field(default=0, init=False, repr=False)

    def act(self, view: PrefillView) -> Keep:
        if self._stage == 0:
            self._entering = len(view.video)
        k = self.counts(self.keep, self._entering, len(self.layers))[self._stage]
        self._stage += 1
        rows = view.attention(layer=view.layer) if self.own_layer else view.attention()
        return Keep(top_k_ascending(rows[0, view.video], k))

    def planned(self, video_tokens: int, groups=None) -> list[int]:
        stages = iter(self.counts(self.keep, video_tokens, len(self.layers)))
        counts, current = [], video_tokens
        for i in range(self.depth):
            if i in self.layers:
                current = next(stages)
            counts.append(current)
        return counts


@register
@dataclass
class FastV(Compressor):
    name = "fastv"
    stages = frozenset({"prefill"})
    # a requested retention sets keep by matching prefill FLOPs (rho_flops)
    retention_knob = RetentionKnob("keep", measure="rho_flops", low=1e-9, high=1.0)
    label_knobs = ("K", "keep")
    K: int = 2
    keep: float = 0.5

    def __post_init__(self):
        check_int("fastv.K", self.K, 1)
        check_range("fastv.keep", self.keep, 0.0, 1.0, low_open=True)

    def prefill_policy(self, llm: LLMShape) -> PruneByLastToken:
        if self.K >= llm.layers:
            raise ValueError(f"fastv.K={self.K}: expected K < {llm.layers}, the LLM's number of layers")
        return PruneByLastToken((self.K,), self.keep, llm.layers)
