"""A deliberately literal, slow restatement of FastVID (Shen et al., NeurIPS 2025, arXiv:2503.11187,
and the official LunarShen/FastVID `modeling_qwen2.py` for its details), in float64.

For tests, the golden file and the benchmark only; it does not import methods/fastvid.py. Dense
products (distances, cosines) are float64 tensor ops, as in the official code; every decision
(cuts, saliency ranks, kNN density, nearest denser token, anchor ranks, assignment, merging) is a
Python loop. It follows the same documented choices as the implementation: clamped counts
(cuts <= F-1, anchors <= M, k <= M, n >= 1), ties to the lower index, and the density noise given
drawn as one (A, M) tensor for the anchor frames in frame order.

`margin` is the smallest gap at any decision (relative where the values are scores), so a test
can skip inputs whose decisions float32 round-off could flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Result:
    tokens: torch.Tensor  # (M_out, D) float64, original order
    positions: list[int]  # original flat index of each token
    segments: list[tuple[int, int]]  # (start, length)
    margin: float


def _gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def reference_fastvid(features, saliency, global_features, retention=0.10, segments=8, seg_tau=0.9,
                      context_share=0.4, anchor_every=4, merge_floor=0.6,
                      noise_seed: int | None = None) -> Result:
    """noise_seed: draw the density tie-break noise as the implementation documents it, one
    torch.rand((A, M), float32) * 1e-6 from a CPU generator with this seed (None: no noise)."""
    x = features.double()
    frames, per_frame, dim = x.shape
    sal = saliency.double().tolist()
    margins = [math.inf]

    # budgets
    n = max(1, int(per_frame * retention))
    n_c = int(n * context_share)
    n_s = n - n_c
    rest = per_frame - n_s

    # 1. DySeg
    g = global_features.double()
    s = []
    for t in range(frames - 1):
        a, b = g[t], g[t + 1]
        s.append(float((a * b).sum() / (a.norm() * b.norm())))
    k = min(segments - 1, frames - 1)
    by_sim = sorted(range(frames - 1), key=lambda t: (s[t], t))
    cuts = set(by_sim[:k]) | {t for t in range(frames - 1) if s[t] < seg_tau}
    margins += [abs(v - seg_tau) for v in s]
    if 0 < k < frames - 1:
        margins.append(abs(s[by_sim[k]] - s[by_sim[k - 1]]))
    segs, start = [], 0
    for t in range(frames):
        if t in cuts or t == frames - 1:
            segs.append((start, t + 1 - start))
            start = t + 1

    # 2. context counts per frame (official anchor distribution)
    ctx = [0] * frames
    for start, length in segs:
        per_anchor = (n_c * length) // ((length + anchor_every - 1) // anchor_every)
        for i in range(length):
            if (length - 1 - i) % anchor_every == 0:
                ctx[start + i] = per_anchor

    out_tokens, out_positions = [], []
    # ATS
    rest_index = []
    for f in range(frames):
        ranked = sorted(range(per_frame), key=lambda i: (-sal[f][i], i))
        for i in ranked[:n_s]:
            out_tokens.append(x[f, i])
            out_positions.append(f * per_frame + i)
        if 0 < n_s < per_frame:
            margins.append(_gap(sal[f][ranked[n_s - 1]], sal[f][ranked[n_s]]))
        rest_index.append(sorted(ranked[n_s:]))

    if n_c > 0:
        # density-peak scores on every frame that holds anchors (ctx >= n_c), noise in frame order
        anchor_frames = [f for f in range(frames) if ctx[f] >= n_c and ctx[f] > 0]
        noise = None
        if noise_seed is not None:
            noise = torch.rand((len(anchor_frames), rest), dtype=torch.float32,
                               generator=torch.Generator().manual_seed(noise_seed)) * 1e-6
        score = {}
        for row, f in enumerate(anchor_frames):
            toks = x[f, rest_index[f]]
            dist = (torch.cdist(toks, toks) / math.sqrt(dim)).tolist()
            for i in range(rest):
                dist[i][i] = 0.0
            kk = min(4, rest)
            density = []
            for i in range(rest):
                nearest = sorted(dist[i])[:kk]
                rho = math.exp(-sum(d * d for d in nearest) / kk)
                if noise is not None:
                    rho += float(noise[row, i])
                density.append(rho)
            far = max(max(r) for r in dist)
            sc = []
            for i in range(rest):
                denser = [dist[i][j] for j in range(rest) if density[j] > density[i]]
                delta = min(denser) if denser else far
                sc.append(delta * density[i])
                # a comparison with a token at least as near as delta decides delta
                margins += [_gap(density[i], density[j]) for j in range(rest)
                            if j != i and dist[i][j] <= delta]
            score[f] = sc

        def anchors_of(f, count):
            ranked = sorted(range(rest), key=lambda i: (-score[f][i], i))
            if count < rest:
                margins.append(_gap(score[f][ranked[count - 1]], score[f][ranked[count]]))
            return ranked[:count]

        def merge(anchor_frame, count, member_frames):
            picks = anchors_of(anchor_frame, count)
            anchors = [x[anchor_frame, rest_index[anchor_frame][j]] for j in picks]
            members = [x[f, i] for f in member_frames for i in rest_index[f]]
            unit_a = torch.stack([a / a.norm() for a in anchors])
            unit_m = torch.stack([m / m.norm() for m in members])
            cosines = (unit_m @ unit_a.T).tolist()  # the dense product; decisions below
            sums = [torch.zeros(dim, dtype=torch.float64) for _ in anchors]
            counts = [0] * len(anchors)
            for m, cos in zip(members, cosines):
                best = max(range(len(cos)), key=lambda j: (cos[j], -j))  # first maximum
                if len(cos) > 1:
                    second = max(c for j, c in enumerate(cos) if j != best)
                    margins.append(abs(cos[best] - second))
                sums[best] += m
                counts[best] += 1
            for j, a in enumerate(anchors):
                w = max(merge_floor, 1 / (counts[j] + 1))
                out_tokens.append(w * a + (1 - w) * sums[j] / max(counts[j], 1))
                out_positions.append(anchor_frame * per_frame + rest_index[anchor_frame][picks[j]])

        for start, length in segs:
            members = list(range(start, start + length))
            for f in members:
                if ctx[f] == n_c:  # single-frame path: own frame only
                    merge(f, n_c, [f])
                elif ctx[f] > n_c:  # multi-frame: the whole segment, once per anchor frame
                    merge(f, min(ctx[f], rest), members)

    order = sorted(range(len(out_positions)), key=lambda j: out_positions[j])
    tokens = torch.stack([out_tokens[j] for j in order]) if order else torch.zeros(0, dim, dtype=torch.float64)
    return Result(tokens, [out_positions[j] for j in order], segs, min(margins))


# ----------------------------------------------------------------------------------------------
# The SigLIP attention-pooling head, literally


def _layer_norm(v: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return (v - mean) / math.sqrt(float(var) + eps) * weight + bias


def _gelu_tanh(v: torch.Tensor) -> torch.Tensor:
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


def reference_siglip_head(encoder_hidden: torch.Tensor, state: dict, heads: int, eps: float):
    """post_layernorm -> probe attention (weights averaged over heads) -> out_proj -> + MLP(LN(.)).

    state: the checkpoint's tensors named `post_layernorm.*`, `head.*`. Returns (pooled (F, C),
    attention (F, P)) in float64."""
    st = {k: v.double() for k, v in state.items()}
    frames, patches, dim = encoder_hidden.shape
    hd = dim // heads
    w_in, b_in = st["head.attention.in_proj_weight"], st["head.attention.in_proj_bias"]
    wq, wk, wv = w_in[:dim], w_in[dim:2 * dim], w_in[2 * dim:]
    bq, bk, bv = b_in[:dim], b_in[dim:2 * dim], b_in[2 * dim:]
    probe = st["head.probe"].reshape(dim)
    q = wq @ probe + bq
    pooled, attention = [], []
    for f in range(frames):
        hs = [_layer_norm(encoder_hidden[f, p].double(), st["post_layernorm.weight"],
                          st["post_layernorm.bias"], eps) for p in range(patches)]
        keys = [wk @ h + bk for h in hs]
        values = [wv @ h + bv for h in hs]
        mean_weights = [0.0] * patches
        context = torch.zeros(dim, dtype=torch.float64)
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            logits = [float((q[sl] * keys[p][sl]).sum()) / math.sqrt(hd) for p in range(patches)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            total = sum(exps)
            for p in range(patches):
                a = exps[p] / total
                mean_weights[p] += a / heads
                context[sl] += a * values[p][sl]
        out = st["head.attention.out_proj.weight"] @ context + st["head.attention.out_proj.bias"]
        normed = _layer_norm(out, st["head.layernorm.weight"], st["head.layernorm.bias"], eps)
        hidden = _gelu_tanh(st["head.mlp.fc1.weight"] @ normed + st["head.mlp.fc1.bias"])
        pooled.append(out + st["head.mlp.fc2.weight"] @ hidden + st["head.mlp.fc2.bias"])
        attention.append(torch.tensor(mean_weights, dtype=torch.float64))
    return torch.stack(pooled), torch.stack(attention)
