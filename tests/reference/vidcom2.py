"""A deliberately literal, slow restatement of VidCom2 (Liu et al., EMNLP 2025, arXiv:2505.14454).

For tests and benchmarks only; it does not import methods/vidcom2.py. Written from the five steps
in methods/vidcom2.py's docstring, with the official code's choices in the details (xuyang-liu16/VidCom2
`token_compressor/vidcom2/vidcom2.py`): population variance, `int(D/2)` channels, normalisation
after the channel selection with max(norm, 1e-12), un-normalised centres, round half to even.
Everything is plain Python over floats (double precision), token by token and channel by channel.
Ties go to the lower index (channels at the variance cut, tokens at a frame's score cut).

It reports how close the input comes to a decision that round-off could flip, so that a float32
test can avoid such inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALPHAS = [2.0 ** e for e in range(-3, 2)]


@dataclass
class VidCom2Result:
    keep: list[list[int]]  # kept token indices of each frame, ascending
    budgets: list[int]  # k_f
    output: torch.Tensor  # (M, D) the kept rows, frame-major
    margin: float  # smallest relative distance of a decision from flipping (see below)


def reference_vidcom2(x: torch.Tensor, retention: float) -> VidCom2Result:
    frames, per_frame, dim = x.shape
    rows = x.reshape(frames * per_frame, dim).double().tolist()
    tokens = len(rows)

    # 1. population variance of every channel over all F*N tokens; the int(D/2) lowest
    means = [sum(row[c] for row in rows) / tokens for c in range(dim)]
    var = [sum((row[c] - means[c]) ** 2 for row in rows) / tokens for c in range(dim)]
    by_var = sorted(range(dim), key=lambda c: (var[c], c))
    half = int(dim * 0.5)
    channels = by_var[:half]
    margins = []
    if 0 < half < dim:  # the cut between kept and dropped channels
        a, b = var[by_var[half - 1]], var[by_var[half]]
        margins.append((b - a) / max(abs(b), 1e-30))

    # 2. L2-normalise the selected channels; the video and frame centres
    y = []
    for row in rows:
        sel = [row[c] for c in channels]
        norm = math.sqrt(sum(v * v for v in sel))
        y.append([v / max(norm, 1e-12) for v in sel])
    video_centre = [sum(t[c] for t in y) / tokens for c in range(half)]
    frame_centre = []
    for f in range(frames):
        members = y[f * per_frame:(f + 1) * per_frame]
        frame_centre.append([sum(t[c] for t in members) / per_frame for c in range(half)])

    # 3. multi-scale Gaussian similarity to each centre
    def kernel(t, centre):
        d2 = sum((t[c] - centre[c]) ** 2 for c in range(half))
        return sum(math.exp(-d2 / (2 * a)) for a in ALPHAS)

    v = [kernel(y[t], video_centre) for t in range(tokens)]
    fs = [kernel(y[t], frame_centre[t // per_frame]) for t in range(tokens)]

    # 4. frame uniqueness, softmax at temperature 0.01, per-frame share
    u = [-sum(v[f * per_frame:(f + 1) * per_frame]) / per_frame for f in range(frames)]
    top = max(u)
    exps = [math.exp((uf - top) / 0.01) for uf in u]
    p = [e / sum(exps) for e in exps]
    mean_p = sum(p) / frames
    share = [min(1.0, retention * (1 + pf - mean_p)) for pf in p]

    # 5. per frame the max(1, round(s_f N)) lowest v + f, in original order
    keep, budgets = [], []
    for f in range(frames):
        wanted = share[f] * per_frame
        k = max(1, round(wanted))
        if k > 1:  # distance from a rounding boundary (irrelevant when clamped to 1)
            margins.append(abs(wanted - math.floor(wanted) - 0.5) / per_frame)
        score = [v[f * per_frame + i] + fs[f * per_frame + i] for i in range(per_frame)]
        order = sorted(range(per_frame), key=lambda i: (score[i], i))
        if k < per_frame:
            margins.append((score[order[k]] - score[order[k - 1]]) / max(abs(score[order[k]]), 1e-30))
        keep.append(sorted(order[:k]))
        budgets.append(k)

    flat = x.reshape(frames * per_frame, dim)
    index = [f * per_frame + i for f in range(frames) for i in keep[f]]
    return VidCom2Result(keep, budgets, flat[index], min(margins, default=math.inf))


def official_style_vidcom2(x: torch.Tensor, retention: float) -> torch.Tensor:
    """The official file's computation restated with tensor ops, as a timing comparator.

    Same numbers as the literal reference (up to float rounding); it mirrors the official code's
    structure: a per-frame Python loop of top-k selections with host-side counts.
    """
    frames, per_frame, dim = x.shape
    flat = x.reshape(frames * per_frame, dim).float()
    var = flat.var(dim=0, unbiased=False)
    sel = flat[:, torch.topk(var, k=int(dim * 0.5), largest=False).indices]
    y = torch.nn.functional.normalize(sel.view(frames, per_frame, -1), dim=-1)
    vc, fc = y.mean(dim=(0, 1), keepdim=True), y.mean(dim=1, keepdim=True)

    def gauss(c):
        d2 = ((y - c) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (2 * a)) for a in ALPHAS)

    v, f = gauss(vc), gauss(fc)
    u = -v.mean(dim=-1)
    p = torch.softmax((u - u.max()) / 0.01, dim=0)
    share = (retention * (1 + p - p.mean())).clamp(max=1.0)
    counts = (share * per_frame).round().long().clamp(min=1).tolist()
    score = v + f
    index = [torch.topk(score[i], k=k, largest=False, sorted=False).indices.sort().values + i * per_frame
             for i, k in enumerate(counts)]
    return x.reshape(frames * per_frame, dim)[torch.cat(index)]
