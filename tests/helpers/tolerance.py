"""How close two computations of the same thing must be, from the dtype and the size of the
computation, never from what one CPU happened to give.

A sum of n terms in floating point with unit roundoff u = eps/2 is within γ_n = n·u / (1 - n·u) of
the exact sum, relative to the sum of the terms' magnitudes (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., §3.1). Two kernels computing the same sum in different orders
(another CPU's SIMD width, a cached against an uncached attention, a float32 path against a
float64 transcription) can therefore differ by up to about 2·γ_n of that magnitude; a chain of
such sums (a few layers) adds up their bounds. `bound(dtype, n)` is that worst case for the
longest reduction `n` in the computation, times the number of chained reductions `depth`; tests
compare with rtol = atol = bound, so values of magnitude ~1 (normalised activations, logits,
probabilities) are held to it relatively and small ones absolutely.

Exact equality (`torch.equal`) is asserted only where both sides run the same kernels on the same
inputs in the same order (e.g. keep-everything against `none`); such a test says so.
"""

from __future__ import annotations

import torch


def bound(dtype: torch.dtype, n: int, depth: int = 1) -> float:
    """2·γ_n per reduction of n terms in `dtype`, over `depth` chained reductions."""
    u = torch.finfo(dtype).eps / 2
    if n * u >= 1:
        raise ValueError(f"no bound for a sum of {n} terms in {dtype}: n·u = {n * u:.3g} >= 1")
    gamma = n * u / (1 - n * u)
    return 2 * gamma * depth


def close(dtype: torch.dtype, n: int, depth: int = 1) -> dict:
    """rtol and atol for torch.testing.assert_close of two `dtype` computations whose longest
    reduction has `n` terms, chained `depth` times."""
    tol = bound(dtype, n, depth)
    return {"rtol": tol, "atol": tol}


def close_probabilities(dtype: torch.dtype, n: int, depth: int = 1) -> dict:
    """rtol and atol for two `dtype` computations of a probability vector over n entries (an
    attention row, a softmax). A difference δ in the scores moves each probability by about δ of
    itself, so every entry is held to `bound` relatively; entries far below the mean 1/n are held
    to bound/n absolutely (rtol = atol = bound would let an entry of a 1/n-sized row move by
    n·bound of itself)."""
    tol = bound(dtype, n, depth)
    return {"rtol": tol, "atol": tol / n}
