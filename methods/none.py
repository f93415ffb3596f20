"""No compression: the uncompressed reference row of every table. Every token keeps its position.

A baseline of this harness (no paper, no official code).
"""

from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import Compressor, VideoTokens, VisualInput


@register
@dataclass
class NoCompression(Compressor):
    name = "none"
    stages = frozenset({"visual"})  # the identity, so it can stand wherever a visual stage does
    reference = True

    def compress(self, x: VisualInput) -> VideoTokens:
        tokens = x.features.flatten(0, 1)
        return VideoTokens(tokens, torch.arange(tokens.shape[0], device=tokens.device))
