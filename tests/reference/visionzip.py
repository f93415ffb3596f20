"""A deliberately literal, slow restatement of VisionZip (Yang et al., CVPR 2025, arXiv:2412.04467),
with this harness's choices (methods/visionzip.py).

For tests and benchmarks only; it does not import methods/. Python loops over frames, tokens and
targets, float64. It starts from the encoder's per-patch inputs: the scores (F, P*P) and keys
(F, P*P, C) are resized to the feature grid by a literal bilinear interpolation (half-pixel
centres, as torch's `interpolate(mode="bilinear", align_corners=False)` that LLaVA-OneVision's
get_2dPool uses), then per frame:

1. k = max(1, round(r*N)), k_d = round(k*54/64), k_c = k - k_d (Python's round).
2. dominant = the k_d highest scores, ties to the lower index, in original order;
3. R = the other tokens in order; targets R[0], R[s], R[2s], ... (the first k_c), s = (N - k_d) // k_c;
4. each other token of R joins the target with the highest cosine of the keys (first on ties; a zero
   key has cosine 0), and a target becomes the mean of itself and its members (this harness's merge);
5. output the dominant tokens, then the contextual tokens in target order.

It also reports the smallest decision margins (relative score gap at the dominant cut, gap between the
best and second-best target cosine) so a test can skip inputs whose decisions float32 round-off could
flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def reference_bilinear(maps: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """(F, P*P, C) -> (F, out_h*out_w, C), float64, per output cell from its four neighbours."""
    frames, patches, channels = maps.shape
    side = math.isqrt(patches)
    grid = maps.double().reshape(frames, side, side, channels)

    def taps(o: int, size_in: int, size_out: int):
        src = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = math.floor(src)
        i1 = i0 + 1 if i0 < size_in - 1 else i0
        frac = src - i0
        return i0, i1, 1.0 - frac, frac

    out = torch.zeros(frames, out_h * out_w, channels, dtype=torch.float64)
    for r in range(out_h):
        y0, y1, wy0, wy1 = taps(r, side, out_h)
        for c in range(out_w):
            x0, x1, wx0, wx1 = taps(c, side, out_w)
            out[:, r * out_w + c] = (wy0 * (wx0 * grid[:, y0, x0] + wx1 * grid[:, y0, x1])
                                     + wy1 * (wx0 * grid[:, y1, x0] + wx1 * grid[:, y1, x1]))
    return out


@dataclass
class VisionZipResult:
    output: torch.Tensor  # (F*k, D) float64
    dominant: list[list[int]]  # per frame, ascending
    targets: list[list[int]]  # per frame, token indices of the targets in target order
    members: list[list[list[int]]]  # per frame and target, the token indices merged into it
    score_margin: float  # smallest gap between the k_d-th and the next score of a frame, relative to
    # the frame's largest score
    cosine_margin: float  # smallest gap between a token's best and second-best target cosine


def reference_split(retention: float, n: int) -> tuple[int, int]:
    k = max(1, round(retention * n))
    k_d = round(k * 54 / 64)
    return k_d, k - k_d


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)


def reference_visionzip_pooled(features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor,
                               retention: float) -> VisionZipResult:
    """On scores (F, N) and keys (F, N, C) already on the feature grid."""
    frames, n, _ = features.shape
    x = features.double()
    k_d, k_c = reference_split(retention, n)
    out, doms, tgts, mems = [], [], [], []
    score_margin = cosine_margin = math.inf
    for f in range(frames):
        s = [float(v) for v in scores[f].double()]
        order = sorted(range(n), key=lambda i: (-s[i], i))
        if k_d < n:
            score_margin = min(score_margin, (s[order[k_d - 1]] - s[order[k_d]]) / max(abs(v) for v in s))
        dominant = sorted(order[:k_d])
        rest = [i for i in range(n) if i not in dominant]
        targets, members = [], []
        if k_c > 0:
            step = len(rest) // k_c
            targets = [rest[p] for p in range(0, len(rest), step)][:k_c]
            members = [[] for _ in targets]
            for i in rest:
                if i in targets:
                    continue
                sims = [_cosine(keys[f, i].double(), keys[f, t].double()) for t in targets]
                best = 0
                for j in range(1, len(sims)):
                    if sims[j] > sims[best]:
                        best = j
                if len(sims) > 1:
                    second = max(v for j, v in enumerate(sims) if j != best)
                    cosine_margin = min(cosine_margin, sims[best] - second)
                members[best].append(i)
        for i in dominant:
            out.append(x[f, i])
        for t, group in zip(targets, members):
            total = x[f, t].clone()
            for i in group:
                total += x[f, i]
            out.append(total / (1 + len(group)))
        doms.append(dominant)
        tgts.append(targets)
        mems.append(members)
    return VisionZipResult(torch.stack(out), doms, tgts, mems, score_margin, cosine_margin)


def reference_visionzip(features: torch.Tensor, patch_scores: torch.Tensor, patch_keys: torch.Tensor,
                        grid: tuple[int, int], retention: float) -> VisionZipResult:
    """From the encoder's per-patch scores (F, P*P) and keys (F, P*P, C)."""
    scores = reference_bilinear(patch_scores[..., None], *grid)[..., 0]
    keys = reference_bilinear(patch_keys, *grid)
    return reference_visionzip_pooled(features, scores, keys, retention)
