"""Prefill FLOPs and the three retention numbers of shared/spec/measurement.md, in one place.

Used by the harness for every sample's retention numbers and by calibration (FLOPs-matched knobs),
and by methods that prune to a FLOPs budget themselves (FrameFusion). The convention is the
token-pruning literature's: a decoder layer on n tokens costs 4·n·d² + 2·n²·d + 2·n·d·m
(hidden size d, FFN size m); the vision encoder and the compressor are counted separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LLMShape:
    """What the FLOPs count needs from an LLM: hidden size, FFN size, number of decoder layers."""

    hidden: int
    ffn: int
    layers: int

    @classmethod
    def of(cls, text_config) -> "LLMShape":
        return cls(text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers)


def layer_flops(n: float, d: int, m: int) -> float:
    """Prefill FLOPs of one decoder layer on n tokens."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(text: float, layer_video: list[float], shape: LLMShape) -> float:
    """Prefill FLOPs when layer i processes `text` text tokens and layer_video[i] video tokens."""
    return sum(layer_flops(text + v, shape.hidden, shape.ffn) for v in layer_video)


def first_pruned(layer_video: list[int]) -> int:
    """Video tokens at the first layer where the LLM prunes (or entering it, if it never does)."""
    return next((v for v in layer_video if v != layer_video[0]), layer_video[0])


def retention_numbers(full_video: int, text: int, layer_video: list[int], shape: LLMShape) -> dict:
    """rho_tok, rho_avg and rho_flops of one prefill.

    full_video: F*N video tokens the uncompressed model would see; text: the other prompt tokens;
    layer_video: video tokens processed at each decoder layer.
    """
    if len(layer_video) != shape.layers:
        raise ValueError(f"{len(layer_video)} per-layer token counts for a {shape.layers}-layer LLM")
    pruned = prefill_flops(text, layer_video, shape)
    return {
        "rho_tok": first_pruned(layer_video) / full_video,
        # what enters the LLM (the visual stage's output): differs from rho_tok when the LLM prunes
        "rho_visual": layer_video[0] / full_video,
        "rho_avg": sum(layer_video) / (shape.layers * full_video),
        "rho_flops": pruned / prefill_flops(text, [full_video] * shape.layers, shape),
        "prefill_tflops": pruned / 1e12,
    }


def tokens_within(budget: float, layers: int, text: float, shape: LLMShape) -> float:
    """The (real) number of video tokens v for which `layers` layers on text + v tokens cost `budget`.

    Solves layers·f(text + v) = budget for v (f is quadratic in the token count); negative when even
    the text alone costs more.
    """
    a, b = 4 * shape.hidden ** 2 + 2 * shape.hidden * shape.ffn, 2 * shape.hidden
    per_layer = budget / layers
    n = (-a + math.sqrt(a * a + 4 * b * per_layer)) / (2 * b)
    return n - text


def encoder_flops(vision_config, frames: int, projector_dim: int | None = None) -> float:
    """FLOPs of the vision encoder on `frames` frames (same convention): patch embedding, every
    encoder layer on the P patches of a frame, and (given the LLM width) the 2-layer projector."""
    side = vision_config.image_size // vision_config.patch_size
    patches, width = side * side, vision_config.hidden_size
    embed = 2 * patches * 3 * vision_config.patch_size ** 2 * width
    layers = vision_config.num_hidden_layers * layer_flops(patches, width, vision_config.intermediate_size)
    projector = 2 * patches * (width + projector_dim) * projector_dim if projector_dim else 0
    return frames * (embed + layers + projector)
