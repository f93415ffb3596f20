"""Qwen3-VL's DeepStack features through the compressors.

Qwen3-VL's vision tower hands the LLM, besides the video tokens, one more (F', N, D) tensor per
DeepStack level (the merged output of an intermediate ViT block, `Qwen3VLVisionModel.forward`'s
`deepstack_features`); the text model adds level l to the hidden states of the video tokens after
decoder layer l (`Qwen3VLTextModel._deepstack_process`). A compressor that keeps, merges or drops a
video token must do the same to its DeepStack features, a merged token merging theirs with the
same weights.

Every visual stage in methods/ computes its output from gathers and weighted means of its input
tokens, the choice of which and with what weights made on the features: once the decisions are
fixed it is linear in the features. So the harness replays the stage under forward-mode AD
(`torch.autograd.forward_ad`), primal = the features, tangent = one DeepStack level: the output's
tangent is that level transformed with the same selection and weights (one replay per level,
outside inference mode). The same replay with tangent = each token's frame index (and = ones, for
the weights' sum) gives a plain (M, D) output's frame: the weighted mean frame of its members.

A replay is trusted only when (`carry`):
- its primal output equals the stage's output (the decisions do not depend on anything but the
  features and the seed), and
- the tangent x * m (the features on half of the channels, m a channel mask) comes out as
  output * m: exactly 0 on the other channels (the stage mixes tokens, never channels, with weights
  that do not move with the features) and the output itself on these (linearity).
A stage that fails either is refused on Qwen3-VL with one line (`ReplayError`);
`check_visual_stage` tries it on a small synthetic input before anything loads. A `VideoTokens`
output whose tokens are exactly the input's tokens at their positions (every keep-positions method
that only selects) needs no replay: its features are the levels at those positions; nor does a plain
output each of whose rows is exactly one input token (a selection that renumbers: VidCom2), whose
features and frames are that token's.

Where forward AD itself fails (an op of the stage has no forward-AD formula: torch's `out=` variants,
`embedding_bag`; DivPrune, VidCom2, VisionZip), the harness replays the stage once on widened
features instead (`widened`): the features with the tangents appended as further channels, scaled
by 2^-40, so small that they move no similarity, norm or score the decisions read (their squares lie
below the rounding of the features' own); each appended block then comes out mixed with the
stage's own selection and weights, and is scaled back (exactly: a power of two). It is trusted on
the same two checks (the first D channels equal the stage's output; the block of the masked
features comes out as output * m); a stage that relates the features to other D-wide inputs (the
question's embeddings) cannot be widened and is refused. float16 features (whose range ends near
2^-24) are not widened.

Inside the LLM, the shared driver adds each level to the video tokens still present after its
layer (methods.core.decoder, `deepstack=`); a prefill policy that merges video tokens (gives kept
ones new hidden states) before the last DeepStack layer cannot carry them and is refused
(`merging_layers`, checked before anything loads; the driver refuses one it did not know of).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from methods.core.base import VideoTokens, VisualInput


class ReplayError(ValueError):
    """A visual stage whose output cannot carry the DeepStack features (one line: why)."""


@dataclass
class DeepStackTokens(VideoTokens):
    """A visual stage's output on Qwen3-VL, with what the prompt needs besides the tokens.

    `original`: the tokens keep their (t, h, w) positions (VideoTokens; `positions` are their
    indices in the F'*N input); False: a plain output, at consecutive positions as text
    (`positions` = 0..M-1, their index in the LLM's video input)."""

    deepstack: torch.Tensor | None = None  # (L, M, D): each token's features at each level
    frames: torch.Tensor | None = None  # (M,) long, ascending: the token frame each token is placed in
    original: bool = True
    carried: str = ""  # how the features followed: kept | selected | forward AD | widened (`carry`)


def _tolerance(dtype: torch.dtype, terms: int) -> float:
    """How far two evaluations of the same weighted means may differ, relative to the output's
    magnitude: a float32 sum of `terms` terms in another order (2·n·u each way), or one rounding of
    the stage's output dtype."""
    return max(2 * torch.finfo(dtype).eps, 4 * terms * torch.finfo(torch.float32).eps / 2)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * max(scale, 1e-30)))


def replay(compressor, visual: VisualInput, tangents: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stage's tokens, and its output's tangent for each (F, N, D) tangent of the features:
    one forward-mode replay per tangent, outside inference mode (the visual input's tensors are
    copied there first: tensors made in inference mode take no tangent). ReplayError if the stage
    fails under forward AD."""
    with torch.inference_mode(False):
        copied = {f.name: getattr(visual, f.name).clone() for f in fields(visual)
                  if isinstance(getattr(visual, f.name), torch.Tensor)}
        features = copied.pop("features")
        outs, primal = [], None
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            for tangent in tangents:
                dual = fwAD.make_dual(features, tangent.to(features.dtype).clone())
                try:
                    out = compressor.compress(replace(visual, features=dual, **copied))
                except Exception as err:  # noqa: BLE001  (any failure under forward AD: one line)
                    raise ReplayError(f"its visual stage fails under forward-mode AD ({type(err).__name__}: "
                                      f"{(str(err).splitlines() or [''])[0][:160]})") from None
                tokens = out.tokens if isinstance(out, VideoTokens) else out
                p, t = fwAD.unpack_dual(tokens)
                primal = p.detach().clone()
                outs.append(torch.zeros_like(primal) if t is None else t.detach().clone())
    return primal, outs


WIDEN = 2.0 ** -40  # the scale of the appended channels of a widened replay
HALF_WAY = 1e-3  # a mean frame within this of halfway between two frames is placed in the earlier


def widened(compressor, visual: VisualInput, blocks: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stage's tokens and, for each (F, N, D) block, that block as the stage mixes it: one run on
    the features widened by the blocks (x 2^-40) as further channels (module docstring).
    ReplayError if the stage fails on them."""
    if visual.features.dtype == torch.float16:
        raise ReplayError("float16 features cannot be widened")
    dim = visual.features.shape[-1]
    wide = torch.cat([visual.features] + [(b * WIDEN).to(visual.features.dtype) for b in blocks], dim=-1)
    try:
        out = compressor.compress(replace(visual, features=wide))
    except Exception as err:  # noqa: BLE001  (any failure on widened features: one line)
        raise ReplayError(f"its widened replay fails ({type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0][:120]})") from None
    tokens = out.tokens if isinstance(out, VideoTokens) else out
    if tokens.shape[-1] != dim * (1 + len(blocks)):
        raise ReplayError(f"its widened replay gives {tokens.shape[-1]} channels, expected {dim * (1 + len(blocks))}")
    return tokens[:, :dim], [tokens[:, dim * (i + 1):dim * (i + 2)].float() / WIDEN for i in range(len(blocks))]


def _replays(compressor, visual: VisualInput, tangents: list[torch.Tensor]):
    """`replay`, else (forward AD failing) `widened`: (primal, tangent outputs, which)."""
    try:
        return (*replay(compressor, visual, tangents), "forward AD")
    except ReplayError as err:
        first = err
    try:
        return (*widened(compressor, visual, tangents), "widened")
    except ReplayError as err:
        raise ReplayError(f"{first}; {err}") from None


def carry(compressor, visual: VisualInput, out, levels: torch.Tensor) -> DeepStackTokens:
    """`out`, the output of `compressor`'s visual stage on `visual` (None: no visual stage, `out`
    keeps every token), with each token's DeepStack features (`levels` (L, F', N, D)) and frame
    (module docstring). A plain output is placed frame by frame (stable: tokens of one frame keep
    their order), a token whose mean frame lies halfway between two in the earlier one (rounding
    error cannot move it across)."""
    frames_in, n, dim = visual.features.shape
    flat = visual.features.flatten(0, 1)
    flat_levels = levels.flatten(1, 2)
    if isinstance(out, VideoTokens) and torch.equal(out.tokens, flat[out.positions]):
        return DeepStackTokens(out.tokens, out.positions, out.groups, flat_levels[:, out.positions],
                               out.positions // n, True, "kept")
    if compressor is None:
        raise ValueError("a visual input without a visual stage must keep every token at its position")
    tokens = out.tokens if isinstance(out, VideoTokens) else out
    plain = not isinstance(out, VideoTokens)
    index = selected_rows(flat, tokens) if plain else None
    if index is not None:  # a selection: each token is one input token
        order = torch.argsort(index // n, stable=True)
        return DeepStackTokens(tokens[order], torch.arange(len(order), device=flat.device), None,
                               flat_levels[:, index[order]], (index // n)[order], False, "selected")
    channels = torch.arange(dim, device=flat.device) % 2 == 0
    check = visual.features * channels.to(visual.features.dtype)
    tangents = [check] + list(levels.unbind(0))
    if plain:
        index = torch.arange(frames_in, device=flat.device, dtype=visual.features.dtype)
        tangents += [index[:, None, None].expand(frames_in, n, dim), torch.ones_like(visual.features)]
    primal, outs, how = _replays(compressor, visual, tangents)
    tol = _tolerance(tokens.dtype, frames_in * n)
    if not _close(primal, tokens, tol):
        raise ReplayError(f"its visual stage gives another output when replayed ({how}: decisions that depend "
                          "on more than the features and the seed)")
    linear = outs[0]
    if bool(linear[:, ~channels].ne(0).any()) or not _close(linear[:, channels], tokens[:, channels], tol):
        raise ReplayError(f"its output is not a fixed weighted mean of its input tokens (the {how} replay "
                          "of the features does not reproduce it channel by channel)")
    deepstack = torch.stack(outs[1:1 + levels.shape[0]]) if levels.shape[0] else flat_levels[:, :0]
    if not plain:
        return DeepStackTokens(out.tokens, out.positions, out.groups, deepstack.to(levels.dtype),
                               out.positions // n, True, how)
    weight = outs[-1][:, 0].float()
    if bool((weight <= 0).any()):
        raise ReplayError("a token of its output has no positive weight on the input tokens")
    mean = outs[-2][:, 0].float() / weight  # a mean frame halfway between two goes to the earlier one
    frames = torch.floor(mean + 0.5 - HALF_WAY).clamp(0, frames_in - 1).long()
    order = torch.argsort(frames, stable=True)
    return DeepStackTokens(tokens[order], torch.arange(len(order), device=flat.device), None,
                           deepstack[:, order].to(levels.dtype), frames[order], False, how)


def selected_rows(flat: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
    """(M,) index of the input row (of `flat`, (T, D)) each row of `tokens` equals exactly, when
    each equals exactly one input row; else None."""
    if tokens.shape[-1] != flat.shape[-1] or tokens.dtype != flat.dtype or len(tokens) == 0:
        return None
    try:
        _, inverse = torch.unique(torch.cat([flat, tokens]), dim=0, return_inverse=True)
    except RuntimeError:  # a dtype or device without row-wise unique: the replay decides
        return None
    rows_in, rows_out = inverse[:len(flat)], inverse[len(flat):]
    count = torch.bincount(rows_in, minlength=int(inverse.max()) + 1)
    if bool((count[rows_out] != 1).any()):
        return None
    where = torch.empty_like(count).scatter_(0, rows_in, torch.arange(len(flat), device=flat.device))
    return where[rows_out]


def synthetic_input(compressor, seed: int = 0) -> VisualInput:
    """A small visual input with everything a visual stage may ask for (`check_visual_stage`): two
    frames of a 4x4 token grid (an 8x8 patch grid), 16 channels."""
    g = torch.Generator().manual_seed(seed)
    frames, h, w, dim = 2, 4, 4, 16
    features = torch.randn(frames, h * w, dim, generator=g)
    scores = torch.rand(frames, 4 * h * w, generator=g)
    return VisualInput(features, (h, w), scores / scores.sum(-1, keepdim=True),
                       torch.randn(frames, 4 * h * w, 8, generator=g), None, (2 * h, 2 * w), True,
                       torch.randn(3, dim, generator=g) if "question" in compressor.needs else None)


def check_visual_stage(compressor) -> None:
    """ReplayError when `compressor`'s visual stage cannot carry DeepStack features, tried on a
    small synthetic input with two levels. A stage that fails on that input even without the replay
    says nothing here (its real inputs decide)."""
    visual = synthetic_input(compressor)
    with torch.inference_mode():
        try:
            out = compressor.compress(visual)
        except Exception:  # noqa: BLE001  (inconclusive: the real input may suit it)
            return
    levels = torch.randn(2, *visual.features.shape, generator=torch.Generator().manual_seed(1))
    carry(compressor, visual, out, levels)


def merging_layers(policy) -> tuple[int, ...]:
    """The decoder layers before which (or, mid-layer, inside which) a prefill policy of methods/
    may give kept video tokens new hidden states (a merge). The driver refuses, at run time, a
    merge before the last DeepStack layer by a policy this does not know of."""
    from methods.framefusion import FrameFusionPolicy
    from methods.holitom import InnerMerge
    from methods.sparsevlm import SparseVLMPolicy
    from methods.sttm import STTMPolicy

    if isinstance(policy, FrameFusionPolicy):  # merge sites before layer 0 and inside every layer
        return tuple(sorted(set(policy.layers) | set(policy.mid_layers)))
    if isinstance(policy, (STTMPolicy, InnerMerge)):
        return tuple(policy.layers)
    if isinstance(policy, SparseVLMPolicy):  # layer 0 only picks raters; each stage recycles
        return tuple(policy.layers[1:]) if policy.recycle > 0 else ()
    return ()
