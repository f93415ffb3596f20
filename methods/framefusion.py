"""FrameFusion: merge video tokens that repeat the previous frame, then prune by attention, in the LLM.

In the first layers, a video token whose hidden state has cosine >= `sim_floor` with the nearest
earlier token at the same grid position is averaged into it, layer by layer while a layer merges
>= `merge_floor` of the tokens; the next layer then keeps the video tokens the last prompt token
attends to most, so that the prefill FLOPs are `cost` times the unpruned prefill's.

Paper: Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large
Vision Language Models", ICCV 2025, arXiv:2501.01986. FLOPs: methods/core/flops.py.
Official code: thu-nics/FrameFusion, read at commit fbec1d2, `framefusion/main.py` (`FrameFusion.forward`,
`compute_similarity_and_token_index_by_patch`, `merge_tokens_and_get_mask`,
`_compute_pruning_ratio`), `framefusion/models/qwen2/modeling_qwen2.py` (where it is called:
before layer 0's attention, then in every layer between attention and MLP),
`framefusion/utils.py` (`scaled_dot_product_attention`, last query only),
`framefusion/models/llava_video/modeling_llava_video.py` (patch types), `framefusion/interface.py`
(defaults cost 0.3, similarity_lower_bound 0.6, ratio_lower_bound 0.1).

As the official code (details this harness takes from it):
- sites: once before layer 0 (on the embeddings), then in layer i between attention and MLP (on the
  residual stream after attention): the driver's `layers=(0,)` and `mid_layers`;
- "previous frame" = the nearest earlier surviving token of the same grid position (after merges it
  can be several frames back); a merged run t_a..t_b collapses into the token just before it:
  h <- unweighted mean of the current states of that token and the run; it keeps its position id;
- the share merged at a site is over the video tokens present there; the site that falls below
  `merge_floor` still merges, then merging stops and the next site prunes with the attention of
  its layer (last prompt token's row, mean over heads, over all entries); if a site's similar
  share reaches the removal share the budget asks for, only the int(p·V) most similar merge and
  nothing is pruned (an official rule);
- counts: int() for the merge count, Python round() for the pruning count.

Deviations (and why):
- `cost` is this harness's target prefill FLOPs ratio (methods/core/flops.py), not the official linear
  video-token budget with num_layers = 28 hard-coded: at each site the removal share is the one that
  leaves, in every later half layer, the video tokens `tokens_within` the FLOPs left (the official
  formula with FLOPs in place of token counts and the model's real depth). Each half layer is
  charged as the harness measures it: a layer's attention at the video tokens it sees, its MLP at
  those it sees. So at the site before layer 0 nothing is paid yet; at the site in layer i, layer
  i's attention has been paid at the tokens present before the site, its MLP is paid at those left
  after it, and the remaining budget is solved over that MLP and the whole layers after it. The
  harness's rho_flops is then `cost` to within one token. (The official counts each whole layer at
  its attention's input: with a cost linear in the tokens and the MLP half free, this rule is the
  official one);
- `cost` below what the prompt allows (the text alone, or the layers already merged, cost more)
  raises a ValueError naming the reachable floor (official: "The cost is too small");
- similarity and means in float32 (official: model dtype, `index_add_` noted as unstable); ties go
  to the lower index (official `topk`: unspecified): in the top-k merge by grid position, then
  frame (the official's ranking order), in pruning by sequence index; grouped-query attention KV
  heads expanded; softmax in float32 (official: model dtype);
- LLaVA-OneVision has one newline after the video: it is text, never merged or pruned (the
  official LLaVA-Video layout has a newline per row, counted as a 15th grid column). Grid
  positions are the tokens' indices in the visual input modulo the tokens per frame
  (`PrefillView.video_index`, `frame_tokens`: 196 on OneVision, the video's h*w on Qwen2.5-VL), so
  a visual stage giving `VideoTokens` in front keeps them; in such a stack `cost` is relative to
  the prefill of the tokens it hands over.
Where merging stops depends on the data, so the policy is called between attention and MLP of every
layer (a no-op once it is done). Host synchronisation: a few scalars per site (how many tokens are
similar, as the official `.item()`, and how many survive).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods import register
from methods.core.base import (
    Compressor,
    RetentionKnob,
    cosine_threshold,
    fraction,
    share,
)
from methods.core.decoder import Keep, PrefillView
from methods.core.flops import (
    LLMShape,
    attention_flops,
    layer_flops,
    mlp_flops,
    prefill_flops,
    tokens_within,
)
from methods.core.select import top_k_ascending

__all__ = ["FrameFusion", "FrameFusionPolicy", "MergeStep", "merge_step", "removal_share"]

FIRST = -2.0  # similarity of a grid position's first token: never merges (official IGNORE_TOKEN)
EXACT = 1e-6  # tokens_within this close to the present count: nothing to remove (cost = 1)


def removal_share(cost: float, text: int, video: int, spent: list[int], spent_mlp: list[int], current: int,
                  shape: LLMShape) -> float:
    """Share of the `current` video tokens to remove now so that, with the same count in every half
    layer not yet paid for, the prefill costs `cost` x the unpruned prefill of text + video tokens.
    0 when the budget allows them all.

    Paid for are the attention halves of the layers in `spent` (the video tokens each one's
    attention saw) and the MLP halves of those in `spent_mlp` (what each one's MLP saw): both empty
    before layer 0, and at a site between layer i's attention and MLP, i + 1 and i entries (layer i's
    attention ran on the tokens present before the site; its MLP runs on those left after it). The
    remaining halves are priced as the harness measures them (methods/core/flops.py).

    The official `_compute_pruning_ratio`, in FLOPs: raises ValueError when even no video token in
    the remaining halves would fit the budget.
    """
    d, m = shape.hidden, shape.ffn
    if not len(spent_mlp) <= len(spent) <= shape.layers:
        raise ValueError(f"removal_share: {len(spent)} attention and {len(spent_mlp)} MLP halves paid for "
                         f"in a {shape.layers}-layer LLM; expected no more MLP halves than attention halves")
    unpruned = prefill_flops(text, [video] * shape.layers, shape)
    budget = cost * unpruned
    paid = sum(attention_flops(text + a, d) for a in spent) + sum(mlp_flops(text + b, d, m) for b in spent_mlp)
    rest, halves = shape.layers - len(spent), len(spent) - len(spent_mlp)  # whole layers, MLP-only halves
    text_only = rest * layer_flops(text, d, m) + halves * mlp_flops(text, d, m)
    if budget - paid < text_only:
        floor = (paid + text_only) / unpruned
        raise ValueError(
            f"framefusion.cost={cost}: unreachable on this prompt ({text} text and {video} video "
            f"tokens): what ran so far ({len(spent)} attention and {len(spent_mlp)} MLP halves) and the "
            f"text alone in the other halves cost {100 * floor:.2f}% of the unpruned prefill FLOPs; "
            "expected cost >= that (official: 'The cost is too small')")
    allowed = tokens_within(budget - paid, rest, text, shape, mlp_only=halves)
    if allowed >= current - EXACT:
        return 0.0
    return 1.0 - allowed / current


@dataclass
class MergeStep:
    """One merging site's outcome over the video tokens present there (sequence order)."""

    keep: torch.Tensor  # (k,) long: indices of the surviving video tokens, ascending
    hidden: torch.Tensor  # (k, D) their states (heads of merged runs averaged), input dtype
    merged: int  # video tokens merged away
    ratio: float  # merged / present
    stop: bool  # merging stops after this site
    prune: bool  # a pruning site follows (False: the merge met the budget itself)


@torch.no_grad()
def merge_step(hidden: torch.Tensor, slots: torch.Tensor, sim_floor: float, limit: float,
               merge_floor: float) -> MergeStep:
    """FrameFusion's merge at one site: hidden (V, D) video states in sequence order, slots (V,) the
    grid position of each; `limit` is the removal share the budget asks for (`removal_share`).

    Each token is compared (cosine) with the previous token of its grid position; if the share of
    tokens with cosine >= sim_floor is below `limit`, all of them merge (and merging stops when the
    share is below `merge_floor`); otherwise only the int(limit·V) most similar merge, and merging
    and pruning stop. A run of merged tokens collapses into the token before it (unweighted mean).
    """
    count, device = hidden.shape[0], hidden.device
    x = hidden.float()  # decisions and means in float32 (no copy for float32 input)
    order = torch.sort(slots, stable=True).indices  # by grid position, then frame ("chain order")
    chained = torch.zeros(count, dtype=torch.bool, device=device)
    chained[1:] = slots[order[1:]] == slots[order[:-1]]  # has a predecessor at its grid position
    first = torch.empty_like(chained)
    first[order] = ~chained  # sequence order from here on
    prev = order.clone()
    prev[order[1:]] = order[:-1]  # the predecessor in chain order (meaningless where `first`)
    # cosine with the predecessor: each norm once, the row-wise dots without a product temporary
    norms = torch.linalg.vector_norm(x, dim=-1)
    dots = torch.einsum("vd,vd->v", x, x[prev])
    sim = torch.where(first, FIRST, dots / (norms * norms[prev]).clamp(min=1e-12))
    similar = sim >= sim_floor
    merged = int(similar.sum())  # the site's decision is taken on the host (official `.item()`)
    ratio = merged / count
    if ratio < limit:
        members, stop, prune = similar, ratio < merge_floor, True
    else:  # the int(limit·V) <= `merged` most similar, all of them similar: the budget is met
        merged = int(limit * count)
        members = torch.zeros(count, dtype=torch.bool, device=device)
        members[order[top_k_ascending(sim[order], merged)]] = True  # ties: chain order
        stop, prune = True, False
    kept = (~members).nonzero().flatten()
    states = x
    if merged:
        # in chain order, a member's run collapses into the last non-member before it; one pass
        # over the rows adds each into its head's row (a kept token is its own head)
        step = torch.arange(count, device=device)
        head = torch.empty_like(order)
        head[order] = order[torch.where(members[order], -1, step).cummax(0).values]
        target = (torch.cumsum(~members, 0) - 1)[head]  # row of the head among the kept
        states = torch.zeros(len(kept), x.shape[1], dtype=x.dtype, device=device).index_add_(0, target, x)
        states /= torch.bincount(target, minlength=len(kept))[:, None]
    return MergeStep(kept, states.to(hidden.dtype), merged, ratio, stop, prune)


@dataclass
class FrameFusionPolicy:
    """The prefill policy: merge sites before layer 0 and between attention and MLP of every layer
    until merging stops, then one pruning site. A fresh policy per prefill (it keeps state)."""

    cost: float
    sim_floor: float
    merge_floor: float
    shape: LLMShape
    merging: bool = field(default=True, init=False)
    pruning: bool = field(default=True, init=False)
    text: int = field(default=0, init=False)  # non-video tokens of the prompt
    video: int = field(default=0, init=False)  # video tokens entering the LLM
    spent: list[int] = field(default_factory=list, init=False)  # video tokens each layer's attention saw
    spent_mlp: list[int] = field(default_factory=list, init=False)  # ... and its MLP (after the layer's site)
    ratios: list[float] = field(default_factory=list, init=False)  # share merged at each merging site

    @property
    def layers(self) -> tuple[int, ...]:
        return (0,)

    @property
    def mid_layers(self) -> tuple[int, ...]:
        return tuple(range(self.shape.layers))

    def planned(self, video_tokens: int, groups=None) -> None:
        return None  # how many tokens merge depends on the data

    def removal_share(self, present: int) -> float:
        return removal_share(self.cost, self.text, self.video, self.spent, self.spent_mlp, present, self.shape)

    def act(self, view: PrefillView) -> Keep | None:
        if not (self.merging or self.pruning):
            return None
        present = len(view.video)
        if not view.mid and view.layer == 0:
            self.text, self.video = view.hidden.shape[1] - present, present
        if view.mid:  # this layer's attention has run on the tokens present now
            self.spent.append(present)
        keep = None
        if present == 0:
            self.merging = self.pruning = False
        elif self.merging:
            limit = self.removal_share(present)
            if view.video_index is None or not view.frame_tokens:
                raise ValueError("framefusion needs each video token's index in the visual input and "
                                 "the tokens per frame (PrefillView.video_index, frame_tokens)")
            slots = view.video_index % view.frame_tokens
            step = merge_step(view.hidden[0, view.video], slots, self.sim_floor, limit, self.merge_floor)
            self.ratios.append(step.ratio)
            self.merging, self.pruning = not step.stop, step.prune
            keep = Keep(step.keep, step.hidden) if step.merged else None
            present -= step.merged
        else:  # the site after merging stopped: prune with this layer's attention
            limit = self.removal_share(present)
            scores = view.attention()[0, view.video]
            present = round(present * (1 - limit))
            keep = Keep(top_k_ascending(scores, present))
            self.pruning = False
        if view.mid:  # and its MLP runs on those left
            self.spent_mlp.append(present)
        return keep


@register
@dataclass
class FrameFusion(Compressor):
    name = "framefusion"
    stages = frozenset({"prefill"})
    # retention=r sets cost = r directly: the target prefill FLOPs ratio (rho_flops)
    retention_knob = RetentionKnob("cost", measure="rho_flops", direct=True)
    label_knobs = ("cost", "sim_floor", "merge_floor")
    cost: float = fraction(0.3, "target prefill FLOPs ratio to `none`")
    sim_floor: float = cosine_threshold(0.6, "merge a token whose cosine to the same position in the "
                                        "previous frame reaches this")
    merge_floor: float = share(0.1, "keep merging while a layer merges at least this share")

    def prefill_policy(self, llm: LLMShape) -> FrameFusionPolicy:
        return FrameFusionPolicy(self.cost, self.sim_floor, self.merge_floor, llm)
