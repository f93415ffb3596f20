"""A deliberately literal restatement of FrameFusion (Fu et al., ICCV 2025, arXiv:2501.01986; official
thu-nics/FrameFusion `framefusion/main.py`; this harness's choices as documented in methods/framefusion.py).

For tests only; it never imports methods/framefusion.py. Python loops, float64:
- `reference_merge_step`: one merging site over a list of video tokens;
- `reference_removal_share`: the FLOPs budget, with the cost of a layer's attention and MLP halves
  written out (each charged at the video tokens it sees) and the token count found by bisection (the
  implementation solves the quadratic);
- `reference_prefill`: the whole prefill on the *stock* eager Qwen2 model, every token kept in the
  sequence at its original position: merged-away and pruned tokens are hidden from every later
  attention by the mask, a run's head gets its merged state by a hook (before layer 0: on the
  embeddings; in layer i: on the attention output, so that residual + output is the merged state),
  and pruning reads the eager attention weights of the layer. It serves the prefill (logits at the
  kept rows) and, with generated tokens appended, an uncached decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FIRST = -2.0


def cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    na, nb = math.sqrt(float((a * a).sum())), math.sqrt(float((b * b).sum()))
    return float((a * b).sum()) / max(na * nb, 1e-12)


@dataclass
class RefStep:
    keep: list[int]  # indices (into the given tokens) of the survivors, ascending
    hidden: torch.Tensor  # (k, D) float64
    merged: int
    ratio: float
    stop: bool
    prune: bool
    margin: float  # smallest |cos - sim_floor|, and the top-k's gap at its cut (smaller: may flip in float32)
    heads: dict = field(default_factory=dict)  # survivor -> members merged into it


def reference_merge_step(hidden: torch.Tensor, slots: list[int], sim_floor: float, limit: float,
                         merge_floor: float) -> RefStep:
    count = len(slots)
    chains = {}  # grid position -> its tokens in sequence order
    for j in range(count):
        chains.setdefault(int(slots[j]), []).append(j)
    by_slot = [j for p in sorted(chains) for j in chains[p]]
    sim, margin = {}, math.inf
    for p in sorted(chains):
        chain = chains[p]
        sim[chain[0]] = FIRST
        for a, b in zip(chain, chain[1:]):
            sim[b] = cos64(hidden[a], hidden[b])
            margin = min(margin, abs(sim[b] - sim_floor))
    similar = [j for j in by_slot if sim[j] >= sim_floor]
    ratio = len(similar) / count
    if ratio < limit:
        members, stop, prune = set(similar), ratio < merge_floor, True
    else:
        ranked = sorted(range(count), key=lambda i: (-sim[by_slot[i]], i))  # ties: grid order
        k = int(limit * count)
        members = {by_slot[i] for i in ranked[:k]}
        if 0 < k < count:  # the ranking's own round-off risk: the gap at the cut
            margin = min(margin, sim[by_slot[ranked[k - 1]]] - sim[by_slot[ranked[k]]])
        stop, prune = True, False
    heads = {}
    for p in sorted(chains):
        head = None
        for j in chains[p]:
            if j in members:
                heads[head].append(j)
            else:
                head = j
                heads[head] = []
    keep = sorted(heads)
    states = torch.stack([
        sum((hidden[m].double() for m in heads[h]), hidden[h].double()) / (1 + len(heads[h]))
        for h in keep]) if keep else hidden.new_zeros(0, hidden.shape[1]).double()
    return RefStep(keep, states, len(members), ratio, stop, prune, margin, heads)


def attention_cost(n: float, d: int) -> float:
    return 4 * n * d * d + 2 * n * n * d


def mlp_cost(n: float, d: int, m: int) -> float:
    return 2 * n * d * m


def reference_removal_share(cost: float, text: int, video: int, attention: list[int], mlp: list[int],
                            current: int, d: int, m: int, layers: int) -> float:
    """The share of the current video tokens to remove when the attention of the layers in
    `attention` and the MLP of those in `mlp` ran on those video tokens; ValueError('... unreachable
    ...')."""
    budget = cost * layers * (attention_cost(text + video, d) + mlp_cost(text + video, d, m))
    paid = sum(attention_cost(text + a, d) for a in attention) + sum(mlp_cost(text + b, d, m) for b in mlp)
    left = budget - paid

    def rest(v):  # every half not paid for, on v video tokens
        halves = [attention_cost(text + v, d)] * (layers - len(attention))
        halves += [mlp_cost(text + v, d, m)] * (layers - len(mlp))
        return sum(halves)

    if left < rest(0):
        raise ValueError("framefusion.cost: unreachable")
    if rest(current) <= left * (1 + 1e-12):
        return 0.0
    lo, hi = 0.0, float(current)
    for _ in range(200):
        mid = (lo + hi) / 2
        if rest(mid) <= left:
            lo = mid
        else:
            hi = mid
    if lo >= current - 1e-6:
        return 0.0
    return 1 - lo / current


@dataclass
class RefRun:
    logits: torch.Tensor  # (1, n, vocab) of the stock forward over every token
    alive: list[int]  # prompt indices the last layer keeps (text + surviving video)
    attention: list[int]  # video tokens each layer's attention sees (its KV cache)
    mlp: list[int]  # video tokens each layer's MLP processes (after the layer's site)
    ratios: list[float]
    margin: float  # smallest distance of any similarity to sim_floor (flip risk)


def reference_prefill(lm, head, embeds: torch.Tensor, span: tuple[int, int], text: int, query: int,
                      cost: float, sim_floor: float, merge_floor: float, frame_tokens: int = 196,
                      positions: torch.Tensor | None = None) -> RefRun:
    """The stock eager Qwen2 `lm` (its layers use eager attention) on `embeds` (1, n, D): prompt
    (+ generated tokens after it); `query` = index of the last prompt token, `text` = the prompt's
    non-video tokens. Video tokens are embeds[start:end], grid position = index % frame_tokens."""
    start, end = span
    n = embeds.shape[1]
    depth = len(lm.layers)
    d, m = lm.config.hidden_size, lm.config.intermediate_size
    video0 = end - start
    alive = list(range(start, end))  # surviving video tokens, sequence order
    hidden_from = set()  # removed video tokens: no later attention sees them
    # per layer run so far: video tokens its attention saw ("inputs") and its MLP ("mlp")
    state = {"merging": True, "pruning": True, "mlp": [], "ratios": [], "margin": math.inf,
             "inputs": [], "residual": None}

    def share(present):
        return reference_removal_share(cost, text, video0, state["inputs"], state["mlp"], present, d, m, depth)

    def merge(h: torch.Tensor) -> dict:
        """Literal merge on h[0, alive]; returns {sequence index: new state} for the heads."""
        present = len(alive)
        step = reference_merge_step(h[0, alive], [(i - start) % frame_tokens for i in alive],
                                    sim_floor, share(present), merge_floor)
        state["margin"] = min(state["margin"], step.margin)
        state["ratios"].append(step.ratio)
        state["merging"], state["pruning"] = not step.stop, step.prune
        new = {}
        for j, s in zip(step.keep, step.hidden):
            if step.heads[j]:
                new[alive[j]] = s
        for j, members in step.heads.items():
            hidden_from.update(alive[i] for i in members)
        alive[:] = [alive[j] for j in step.keep]
        return new

    def mask():
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[:, sorted(hidden_from)] = False
        allowed |= torch.eye(n, dtype=torch.bool)  # a hidden token's own row (unused) stays finite
        return torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    def before(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if module.self_attn.layer_idx == 0 and state["merging"]:  # site 0: on the embeddings
            h = h.clone()
            for i, s in merge(h).items():
                h[0, i] = s.to(h.dtype)
            args = (h,) + tuple(args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = h
        state["residual"] = h
        state["inputs"].append(len(alive))
        kwargs["attention_mask"] = mask()
        return args, kwargs

    def after_attention(module, args, kwargs, output):
        out, weights = output[0], output[1]
        residual = state["residual"]
        if state["merging"]:
            new = merge(residual + out)
            out = out.clone()
            for i, s in new.items():
                out[0, i] = s.to(out.dtype) - residual[0, i]
        elif state["pruning"]:
            present = len(alive)
            p = share(present)
            row = weights[0, :, query].double().mean(0)  # last prompt token, mean over heads
            k = round(present * (1 - p))
            ranked = sorted(range(present), key=lambda j: (-float(row[alive[j]]), j))[:k]
            hidden_from.update(alive[j] for j in range(present) if j not in set(ranked))
            alive[:] = [alive[j] for j in sorted(ranked)]
            state["pruning"] = False
        state["mlp"].append(len(alive))  # what this layer's MLP runs on
        return (out,) + tuple(output[1:])

    handles = []
    for layer in lm.layers:
        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(after_attention, with_kwargs=True))
    try:
        with torch.no_grad():
            pos = torch.arange(n)[None] if positions is None else positions
            hidden = lm(inputs_embeds=embeds, position_ids=pos, use_cache=False).last_hidden_state
            logits = head(hidden)
    finally:
        for h in handles:
            h.remove()
    kept = [i for i in range(n) if i not in hidden_from]
    return RefRun(logits, kept, state["inputs"], state["mlp"], state["ratios"], state["margin"])
