"""The three retention numbers of shared/spec/measurement.md, and prefill FLOPs."""

from __future__ import annotations


def layer_flops(n: int, d: int, m: int) -> float:
    """Prefill FLOPs of one decoder layer on n tokens (the token-pruning literature's convention)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def retention_numbers(full_video: int, text: int, layer_video: list[int], d: int, m: int) -> dict:
    """rho_tok, rho_avg and rho_flops of one prefill.

    full_video: F*N video tokens the uncompressed model would see; text: the other prompt tokens;
    layer_video: video tokens processed at each decoder layer.
    """
    layers = len(layer_video)
    pruned = sum(layer_flops(text + v, d, m) for v in layer_video)
    return {
        "rho_tok": layer_video[-1] / full_video,
        "rho_avg": sum(layer_video) / (layers * full_video),
        "rho_flops": pruned / (layers * layer_flops(text + full_video, d, m)),
        "prefill_tflops": pruned / 1e12,
    }
