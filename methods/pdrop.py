"""PyramidDrop: drop video tokens inside the LLM in stages, a pyramid of shrinking sequences.

Before each of three layers (L/4, L/2, 3L/4) the last prompt token's attention at that layer ranks
the video tokens that reached it; stage s keeps max(1, int(V0·lambda^s)) of the V0 video tokens
entering the LLM. Text tokens are never dropped; kept tokens keep their original position ids.

Paper: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025, arXiv:2410.17247. FLOPs: methods/core/flops.py.
Official code: Cooperx521/PyramidDrop, read at commit 6444f30, `llava/model/modeling_llama_pdrop.py`
(`pdrop_forward`, `pdrop_rank_drop`), `llava/eval/model_vqa_loader.py`, `scripts/v1_5/pdrop_eval/gqa.sh`
(layer_list [8,16,24], image_token_ratio_list [1, λ, λ², λ³] with λ = 0.5, 32-layer LLaMA).

As the official code (a ranking "as FastV" leaves the layer and the counts open):
- ranking at layer K uses layer K's own input norm, q/k projections and RoPE on the sequence
  entering it (the official "rank_layer"), i.e. `view.attention(layer=K)`, not layer K-1's map;
- counts are cumulative from V0 and floored: stage s keeps int(V0·λ^s), not λ of the current count.

Deviations (and why):
- positions: kept tokens keep their original position ids (this harness's prefill-stage rule); the
  official code renumbers them 0..n'-1 after every drop and shifts decode positions accordingly;
- layers: the official code exists only for 32-layer LLaVA-1.5 ([8, 16, 24]); the default here is
  this harness's L/4, L/2, 3L/4 of the model's depth (Python round), so (7, 14, 21)
  for LLaVA-OV-7B, (2, 4, 6) for the 8-layer smoke model; `layers` may be given explicitly;
- counts: max(1, ·) so a stage never drops every video token (official can keep 0), and
  int(V0·λ^s + 1e-6): the official code receives literal ratio lists (0.49), here λ^s is computed
  (0.7**2*100 = 48.999...), so a 1e-6 guard keeps the intended integer;
- grouped-query attention: KV heads expanded (Qwen2; the official LLaMA-1.5 is multi-head);
  softmax and head mean in float32 (official: fp16 after softmax); ties go to the lower index
  (official `topk`: unspecified);
- the knob is `lambda_` (`lambda` is a Python keyword); `retention=` matches prefill FLOPs by
  bisection over it (the per-layer counts are planned exactly, `planned`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from methods import register
from methods.core.base import Compressor, RetentionKnob, check_layer, fraction, knob
from methods.core.flops import LLMShape
from methods.fastv import PruneByLastToken

__all__ = ["PyramidDrop", "default_layers", "pyramid_counts", "pyramid_policy"]

GUARD = 1e-6  # V0·λ^s within this of an integer is that integer (see the docstring)


def default_layers(depth: int) -> tuple[int, ...]:
    """This harness's L/4, L/2, 3L/4 (official [8, 16, 24] of 32 layers), Python-rounded."""
    if depth < 4:
        raise ValueError(f"pdrop.layers: the default L/4, L/2, 3L/4 needs an LLM of at least 4 "
                         f"layers, this one has {depth}; give the layers explicitly")
    return tuple(round(depth * q / 4) for q in (1, 2, 3))


def pyramid_counts(lambda_: float, video_tokens: int, stages: int) -> list[int]:
    """Video tokens kept after each stage: max(1, int(V0·λ^s)) for s = 1..stages (official cumulative
    ratio list [1, λ, λ², λ³], floored)."""
    return [max(1, math.floor(video_tokens * lambda_ ** s + GUARD)) for s in range(1, stages + 1)]


def pyramid_policy(layers: tuple[int, ...], lambda_: float, depth: int) -> PruneByLastToken:
    """The prefill policy: before each layer of `layers`, keep the stage's count of video tokens
    with the highest attention from the last prompt token at that layer."""
    return PruneByLastToken(tuple(layers), lambda_, depth, counts=pyramid_counts, own_layer=True)


@register
@dataclass
class PyramidDrop(Compressor):
    name = "pdrop"
    stages = frozenset({"prefill"})
    # a requested retention sets lambda by matching prefill FLOPs (rho_flops)
    retention_knob = RetentionKnob("lambda_", measure="rho_flops")
    label_knobs = ("layers", "lambda_")
    layers: list[int] | None = knob(None, "the stages' layers, increasing (null: L/4, L/2, 3L/4 of the "
                                    "LLM's depth)", kind="layers", low=1, optional=True)
    lambda_: float = fraction(0.5, "share of the video tokens reaching a stage that it keeps")

    def validate(self):
        if self.layers is not None:
            self.layers = list(self.layers)
            if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
                raise ValueError(f"pdrop.layers={self.layers}: expected increasing layer indices")

    def resolved_layers(self, depth: int) -> tuple[int, ...]:
        layers = default_layers(depth) if self.layers is None else tuple(self.layers)
        check_layer("pdrop.layers", layers[-1], depth)
        return layers

    def prefill_policy(self, llm: LLMShape) -> PruneByLastToken:
        return pyramid_policy(self.resolved_layers(llm.layers), self.lambda_, llm.layers)
