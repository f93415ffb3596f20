"""FastV: prune video tokens inside the LLM, by the attention the last prompt token pays them.

Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models", ECCV 2024, arXiv:2403.06764. Retention and FLOPs: methods/core/flops.py.
Official code: pkunlp-icler/FastV, read at commit d165972,
`src/transformers/src/transformers/models/llama/modeling_llama.py`, `LlamaModel.forward` (its
`FASTV_INPLACE` branch: top-k of layer K-1's head-mean attention of the last token, kept tokens at
their original position ids). That branch is marked "KV-Cache not supported"; the KV-cache rule
(choice of this harness: layers >= K cache only the kept tokens, at their original positions) fixes it.

A prefill policy of the shared decoder driver (`methods.core.decoder`): before layer K it takes one row
of attention at layer K-1 (the last position over every position, recomputed from that layer's
input so the model keeps its SDPA kernel), keeps the k = max(1, round(keep*V)) video tokens it
attends to most (ties: lower index) plus every text token, and layers K..L-1 run on that shorter
sequence. The driver keeps original position ids and per-layer caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from methods import register
from methods.core.base import Compressor, RetentionKnob, check_layer, fraction, layer
from methods.core.decoder import Keep, PrefillView
from methods.core.flops import LLMShape
from methods.core.select import kept_count, top_k_ascending


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
    retention_knob = RetentionKnob("keep", measure="rho_flops")
    label_knobs = ("K", "keep")
    K: int = layer(2, "layers 0..K-1 see every video token")
    keep: float = fraction(0.5, "share of video tokens kept from layer K on")

    def prefill_policy(self, llm: LLMShape) -> PruneByLastToken:
        check_layer("fastv.K", self.K, llm.layers)
        return PruneByLastToken((self.K,), self.keep, llm.layers)
