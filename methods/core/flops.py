"""Prefill FLOPs and the harness's three retention numbers (rho_tok, rho_avg, rho_flops), in one place.

Used by the harness for every sample's retention numbers and by calibration (FLOPs-matched knobs),
and by methods that prune to a FLOPs budget themselves (FrameFusion). The convention is the
token-pruning literature's: a decoder layer on n tokens costs 4·n·d² + 2·n²·d + 2·n·d·m
(hidden size d, FFN size m); the vision encoder and the compressor are counted separately.

A layer is charged in two halves: its attention (4·n·d² + 2·n²·d) at the tokens its attention sees
and its MLP (2·n'·d·m) at the tokens its MLP sees. They differ only in a layer where a method acts
between the two (FrameFusion); everywhere else n' = n and the halves add up to the layer's cost.
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

    def scaled_layer(self, official: int, official_depth: int = 28, highest: int | None = None) -> int:
        """A method's official layer `official` of an `official_depth`-layer LLM (LLaVA-OV-7B and
        Qwen2.5-VL-7B have 28) at the same relative depth here: round(official * L / official_depth),
        within [1, highest] (default L - 1, the last layer a pruned set can reach)."""
        highest = self.layers - 1 if highest is None else highest
        if highest < 1:
            raise ValueError(f"an LLM of {self.layers} layer(s) has no layer in [1, {highest}] to act at")
        return min(highest, max(1, round(official * self.layers / official_depth)))


@dataclass(frozen=True)
class VisionShape:
    """What an encoder-stage method plans with (methods.core.base.EncoderPolicy): patch tokens per
    frame, the encoder layers whose output the model uses, their width, FFN size and heads, and the
    tokens per frame the model gives the LLM without the method (`tokens`: LLaVA-OneVision's pooled
    14x14 = 196, the micro model's 8x8 = 64; what a retention is a share of)."""

    patches: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    tokens: int


def attention_flops(n: float, d: int) -> float:
    """Prefill FLOPs of one decoder layer's attention half on n tokens (projections and scores)."""
    return 4 * n * d * d + 2 * n * n * d


def mlp_flops(n: float, d: int, m: int) -> float:
    """Prefill FLOPs of one decoder layer's MLP half on n tokens."""
    return 2 * n * d * m


def layer_flops(n: float, d: int, m: int) -> float:
    """Prefill FLOPs of one decoder layer on n tokens (both halves)."""
    return attention_flops(n, d) + mlp_flops(n, d, m)


def prefill_flops(text: float, layer_video: list[float], shape: LLMShape,
                  mlp_video: list[float] | None = None) -> float:
    """Prefill FLOPs when layer i's attention processes `text` text tokens and layer_video[i] video
    tokens, and its MLP `text` and mlp_video[i] (default: layer_video[i])."""
    if mlp_video is None:
        mlp_video = layer_video
    if len(mlp_video) != len(layer_video):
        raise ValueError(f"{len(layer_video)} attention and {len(mlp_video)} MLP per-layer token counts: "
                         "expected one of each per layer")
    d, m = shape.hidden, shape.ffn
    return sum(attention_flops(text + a, d) + mlp_flops(text + b, d, m) for a, b in zip(layer_video, mlp_video))


def first_pruned(layer_video: list[int]) -> int:
    """Video tokens at the first layer where the LLM prunes (or entering it, if it never does)."""
    return next((v for v in layer_video if v != layer_video[0]), layer_video[0])


def retention_numbers(full_video: int, text: int, layer_video: list[int], shape: LLMShape,
                      mlp_video: list[int] | None = None) -> dict:
    """rho_tok, rho_avg and rho_flops of one prefill.

    full_video: F*N video tokens the uncompressed model would see; text: the other prompt tokens;
    layer_video: video tokens each decoder layer's attention processes (what its KV cache holds);
    mlp_video: video tokens each layer's MLP processes (default: the same; fewer in a layer where a
    method acts between attention and MLP). rho_tok (first pruned layer) and rho_avg (mean over
    layers) are read from the attention counts; rho_flops charges each half at its own count.
    """
    if len(layer_video) != shape.layers:
        raise ValueError(f"{len(layer_video)} per-layer token counts for a {shape.layers}-layer LLM")
    pruned = prefill_flops(text, layer_video, shape, mlp_video)
    return {
        "rho_tok": first_pruned(layer_video) / full_video,
        # what enters the LLM (the visual stage's output): differs from rho_tok when the LLM prunes
        "rho_visual": layer_video[0] / full_video,
        "rho_avg": sum(layer_video) / (shape.layers * full_video),
        "rho_flops": pruned / prefill_flops(text, [full_video] * shape.layers, shape),
        "prefill_tflops": pruned / 1e12,
    }


def tokens_within(budget: float, layers: int, text: float, shape: LLMShape, mlp_only: int = 0) -> float:
    """The (real) number of video tokens v for which `layers` whole layers and `mlp_only` further MLP
    halves, all on text + v tokens, cost `budget`.

    Solves layers·f(text + v) + mlp_only·g(text + v) = budget for v (f, the layer's cost, is
    quadratic in the token count; g, the MLP's, linear); negative when even the text alone costs
    more.
    """
    if layers < 0 or mlp_only < 0 or layers + mlp_only == 0:
        raise ValueError(f"tokens_within: {layers} layers and {mlp_only} MLP halves; expected at least one")
    d, m = shape.hidden, shape.ffn
    if layers == 0:
        return budget / (mlp_only * 2 * d * m) - text
    # per whole layer: a·n + b·n² = budget / layers, the MLP halves spread over the layers
    a, b = 4 * d * d + 2 * d * m + mlp_only * 2 * d * m / layers, 2 * d
    per_layer = budget / layers
    n = (-a + math.sqrt(a * a + 4 * b * per_layer)) / (2 * b)
    return n - text


def encoder_flops(vision_config, frames: int, projector_dim: int | None = None,
                  layer_tokens: list[tuple[int, int]] | None = None) -> float:
    """FLOPs of the vision encoder on `frames` frames (same convention): patch embedding, every
    encoder layer on the P patches of a frame, and (given the LLM width) the 2-layer projector.

    layer_tokens: per encoder layer run, the tokens per frame its attention and its MLP see, where an
    encoder-stage method merges tokens between the two (ToMe; EncoderPolicy.layer_tokens); the
    projector then runs on the last MLP's count."""
    side = vision_config.image_size // vision_config.patch_size
    patches, width, ffn = side * side, vision_config.hidden_size, vision_config.intermediate_size
    if layer_tokens is None:
        layer_tokens = [(patches, patches)] * vision_config.num_hidden_layers
    embed = 2 * patches * 3 * vision_config.patch_size ** 2 * width
    layers = sum(attention_flops(a, width) + mlp_flops(m, width, ffn) for a, m in layer_tokens)
    out = layer_tokens[-1][1] if layer_tokens else patches
    projector = 2 * out * (width + projector_dim) * projector_dim if projector_dim else 0
    return frames * (embed + layers + projector)
