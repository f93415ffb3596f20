"""A deliberately literal restatement of SparseVLM v1.5 (Zhang et al., ICML 2025; official
Gumpest/SparseVLMs v1.5 734d900 `LlamaDynamicvitModel.forward`, `score.py::attn_postprocess_topk`,
`utils.py::cluster_and_merge`; this harness's choices as documented in methods/sparsevlm.py). For
tests only; it never imports methods/sparsevlm.py.

- `reference_counts`: the official count arithmetic with exact fractions.
- `reference_raters`: float64 dot products, the softmax and means written out.
- `reference_stage`: one stage on given scores and states: sorted() rankings (ties: lower index),
  DPC-kNN written out with float64 loops (distances / sqrt(C), density over the k nearest with self,
  the given tie-break noise, delta, score, nearest centre), sum / (count + 1e-6).
- `reference_prefill`: the whole prefill through the *stock* eager model's decoder layers (each
  called as the model calls it, explicit rotary positions and causal masks): the raters' attention
  of the stage's layer from that layer's own eager attention weights, the sequence rebuilt by
  `reference_stage` after it. Tokens after the prompt (generated ones) may follow: they ride along, never pruned, at
  the next positions of each slice (compact) or after the prompt's original ids (original): the
  uncached reference of decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

NOISE = 1e-6


def reference_counts(video: int, schedule, recycle: float = 0.3, cluster_div: int = 10) -> list[tuple[int, int]]:
    share = Fraction(repr(recycle))
    out, current = [], video
    for k in schedule:
        kept = min(k, current - 1)
        dropped = current - kept
        recycled = math.floor(dropped * share) + 1
        clusters = recycled // cluster_div + 1
        out.append((kept, clusters))
        current = kept + clusters
    return out


def reference_raters(video: torch.Tensor, text: torch.Tensor) -> list[int]:
    logits = (video.detach().double() @ text.detach().double().T).tolist()  # (v, q) dot products
    scores = [0.0] * len(text)
    for row in logits:
        top = max(row)
        exps = [math.exp(x - top) for x in row]
        total = sum(exps)
        for j, e in enumerate(exps):
            scores[j] += e / total / len(logits)
    mean = sum(scores) / len(scores)
    chosen = [j for j, s in enumerate(scores) if s > mean]
    return chosen or list(range(len(text)))


@dataclass
class RefStage:
    entries: list[int]  # the entries (indices into the stage's video tokens) in their new sequence order
    states: torch.Tensor  # (k', D) float64, in that order
    kept: int  # how many of `entries` are kept tokens (the rest are cluster centres)
    margin: float  # smallest gap at any ranking or nearest-centre decision
    density_gap: float  # smallest gap between two densities (ties are broken by the 1e-6 noise,
    # which float32 resolves only to about 1e-7 near 1)


def reference_stage(scores: list[float], states: torch.Tensor, k: int, noise: torch.Tensor,
                    recycle: float = 0.3, cluster_div: int = 10) -> RefStage:
    """noise: (m,) the tie-break draws for the m recycled tokens, in their (descending score) order."""
    current = len(scores)
    states = states.double()
    ranked = sorted(range(current), key=lambda i: (-scores[i], i))
    count = min(k, current - 1)
    margin = scores[ranked[count - 1]] - scores[ranked[count]] if 0 < count < current else math.inf
    kept = sorted(ranked[:count])
    dropped = sorted(ranked[count:])
    recycled_count = math.floor(len(dropped) * Fraction(repr(recycle))) + 1
    clusters = recycled_count // cluster_div + 1
    recycled = sorted(dropped, key=lambda i: (-scores[i], i))[:recycled_count]
    if recycled_count < len(dropped):
        by_score = sorted(dropped, key=lambda i: (-scores[i], i))
        margin = min(margin, scores[by_score[recycled_count - 1]] - scores[by_score[recycled_count]])
    x = [states[i] for i in recycled]
    rows = [r.tolist() for r in x]
    m, dim = len(x), states.shape[1]
    dist = [[math.sqrt(sum((p - q) ** 2 for p, q in zip(rows[a], rows[b]))) / math.sqrt(dim) for b in range(m)]
            for a in range(m)]
    density = []
    for a in range(m):
        nearest = sorted(dist[a])[:clusters]
        density.append(math.exp(-sum(d * d for d in nearest) / len(nearest)) + float(noise[a]))
    far = max(max(row) for row in dist)
    delta = [min([dist[a][b] for b in range(m) if density[b] > density[a]], default=far) for a in range(m)]
    score = [density[a] * delta[a] for a in range(m)]
    by = sorted(range(m), key=lambda a: (-score[a], a))
    centres = by[:clusters]
    for i in range(min(clusters, m - 1)):  # the centres, their order and the cut
        margin = min(margin, score[by[i]] - score[by[i + 1]])
    density_gap = min([abs(density[a] - density[b]) for a in range(m) for b in range(a)], default=math.inf)
    label = []
    for a in range(m):
        if a in centres:
            label.append(centres.index(a))
        else:
            near = sorted(range(clusters), key=lambda c: (dist[a][centres[c]], c))
            if clusters > 1:
                margin = min(margin, dist[a][centres[near[1]]] - dist[a][centres[near[0]]])
            label.append(near[0])
    merged = []
    for c in range(clusters):
        members = [x[a] for a in range(m) if label[a] == c]
        merged.append(sum(members) / (len(members) + 1e-6))
    entries = kept + [recycled[c] for c in centres]
    out = torch.stack([states[i] for i in kept] + merged) if entries else states[:0]
    return RefStage(entries, out, len(kept), margin, density_gap)


def run_layers(lm, hidden, positions, first, last, attention=False):
    """The stock decoder layers first..last (inclusive) on `hidden` at `positions`, causal (their own
    forward, called as the model calls them): (output of layer `last`, its eager attention weights
    (1, heads, n, n) if asked)."""
    n = hidden.shape[1]
    mask = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                         torch.finfo(hidden.dtype).min)[None, None]
    rotary = lm.rotary_emb(hidden, positions)
    weights = None
    with torch.no_grad():
        for i in range(first, last + 1):
            layer = lm.layers[i]
            if attention and i == last:
                _, weights = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                                             position_embeddings=rotary)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary)
    return hidden, weights


@dataclass
class RefPrefill:
    logits: torch.Tensor  # (1, n_final, vocab)
    origin: list[int]  # prompt index of each final entry, in sequence order
    counts: list[int]  # video tokens per layer
    margin: float
    density_gap: float


def reference_prefill(lm, head, embeds: torch.Tensor, span: tuple[int, int], prompt: int, layers,
                      schedule, seed: int, positions: str = "compact", recycle: float = 0.3,
                      cluster_div: int = 10) -> RefPrefill:
    """`lm`: the stock Qwen2 model loaded with eager attention; embeds (1, T', D), the prompt's first
    `prompt` entries then generated tokens; positions 0..T'-1 originally (1-D)."""
    start, end = span
    total = embeds.shape[1]
    chosen = reference_raters(embeds[0, start:end], embeds[0, end:prompt])
    rater_origin = [end + j for j in chosen]
    generator = torch.Generator("cpu").manual_seed(seed)
    hidden, origin = embeds, list(range(total))
    is_video = [start <= o < end for o in origin]
    pos = torch.arange(total)[None]
    first, margin, gap, counts, current = 0, math.inf, math.inf, [], end - start
    for stage_index, layer in enumerate(layers):
        out, weights = run_layers(lm, hidden, pos, first, layer, attention=True)
        counts += [current] * (layer + 1 - first)
        video_entries = [i for i, o in enumerate(origin) if o < total and is_video[o]]
        rows = [origin.index(o) for o in rater_origin]
        attn = weights[0].double().mean(0).tolist()  # (n, n), mean over heads
        scores = [sum(attn[r][v] for r in rows) / len(rows) for v in video_entries]
        current_video = len(video_entries)
        kept = min(schedule[stage_index], current_video - 1)
        dropped = current_video - kept
        recycled = math.floor(dropped * Fraction(repr(recycle))) + 1
        noise = torch.rand((1, recycled), generator=generator, dtype=torch.float32)[0] * NOISE
        result = reference_stage(scores, out[0, video_entries], schedule[stage_index], noise, recycle, cluster_div)
        margin, gap = min(margin, result.margin), min(gap, result.density_gap)
        before = [i for i in range(video_entries[0])]
        after = [i for i in range(video_entries[-1] + 1, len(origin))]
        new_video_origin = [origin[video_entries[e]] for e in result.entries]
        hidden = torch.cat([out[:, before], result.states[None].to(out.dtype), out[:, after]], 1)
        origin = [origin[i] for i in before] + new_video_origin + [origin[i] for i in after]
        if positions == "compact":
            pos = torch.arange(len(origin))[None]
        else:
            pos = torch.tensor(origin)[None]
        current = len(result.entries)
        first = layer + 1
    counts += [current] * (len(lm.layers) - first)
    hidden, _ = run_layers(lm, hidden, pos, first, len(lm.layers) - 1)
    with torch.no_grad():
        logits = head(lm.norm(hidden))
    return RefPrefill(logits, origin, counts, margin, gap)
