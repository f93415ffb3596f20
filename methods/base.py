"""The one interface every compressor implements.

A compressor is a small dataclass whose fields are its knobs. It declares the stage it acts in:

- "visual": `compress(VisualInput) -> (M, D) tokens`, applied to the pooled video features
  before the LLM (Scissor, uniform pooling, attention top-k, none).
- "llm": it changes the LLM's prefill itself (FastV); see `LLMStageCompressor`.

Nothing here knows about Hydra, lmms_eval or files: it is tensor code, on any device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class VisualInput:
    """What the vision side of LLaVA-OneVision hands to a visual-stage compressor."""

    features: torch.Tensor  # (F, N, D): projected, 2x2-pooled features, N = h*w tokens per frame
    grid: tuple[int, int]  # (h, w) of the pooled per-frame grid, 14x14 for OneVision
    patch_scores: torch.Tensor | None = None  # (F, H*W) attention received per encoder patch, if asked


class Compressor:
    """Base class. Subclasses are dataclasses registered with `@register`."""

    name: ClassVar[str]
    stage: ClassVar[str] = "visual"
    needs_patch_scores: ClassVar[bool] = False  # ask the adapter for vision-encoder attention
    is_reference: ClassVar[bool] = False  # the uncompressed reference (`none`): no retention applies
    seed: int = 0  # set by the harness; methods that sample draw from a generator seeded by it

    def compress(self, x: VisualInput) -> torch.Tensor:
        """(M, D) tokens for the LLM; visual-stage methods override this."""
        raise TypeError(f"{type(self).__name__} is a {self.stage}-stage method: it has no compress()")

    def knobs(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False):
    """Raise ValueError('<method>.<knob>=value: expected ...') when `value` is out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: expected a number")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={value}: expected a value in {lo}{low}, {high}{hi}")
