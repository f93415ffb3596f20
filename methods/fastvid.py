"""FastVID: segment the video by global-feature similarity, keep each frame's most salient tokens,
and condense the rest of each segment into a few density-peak anchors (DySeg + STPrune: ATS + DTM).
Visual stage; kept tokens stay in original order and keep their original position ids.

Paper: Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
NeurIPS 2025, arXiv:2503.11187. Official code followed: LunarShen/FastVID, read at commit ea8b57e
(the files are unchanged at the newer a40a109, a README update),
`fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py` (the block
`FastVID` in `Qwen2Model.forward`: DySeg, anchor distribution, ATS, per-frame density scores,
single- and multi-frame DTM, original position ids), `.../multimodal_encoder/siglip_encoder.py`
(`SigLipVisionAbstract`: post_layernorm + attention-pooling head on the projector's input) and
`fastvid_llavaonevision/scripts/eval.sh` (defaults r=0.10, c=8, tau=0.9, d=0.4, p=4, beta=0.6).
ModelTC/LightCompress `llmc/compression/token_reduction/fastvid.py` (read at commit 9701d035) is the same
algorithm.

Inputs (a global feature per frame and a saliency per token):
- `siglip_path` given: the SigLIP checkpoint's `post_layernorm` and attention-pooling head run on
  `encoder_hidden` (what the projector receives), as the official code does; the global feature
  is the head's pooled output, the saliency the probe's attention over the patches, mean over
  heads, pooled 27x27 -> 14x14 bilinearly like the features (`methods.topk.pooled_scores`).
- otherwise this harness's fallback: global feature = the frame's mean pooled feature, saliency =
  pooled `patch_scores`; the method reports `head == "fallback"` (knob `siglip_path: None`).

In the details the official code decides:
- n = int(N*r), n_c = int(n*d), n_s = n - n_c per frame; a segment of L frames has
  T = ceil(L/p) anchor frames (those with (L-1-i) % p == 0), each with floor(n_c*L/T) anchors
  (the segment's total may fall short of n_c*L, as official).
- density-peak scores are computed per anchor frame over that frame's M = N - n_s non-salient
  tokens (kNN k=4 incl. self, d = ||x_i - x_j|| / sqrt(D), methods/core/clustering.py), not over the
  segment; each anchor frame takes its own top scores.
- members of a merge are all non-salient tokens of the segment, the anchors included (an anchor
  joins itself, so w = max(alpha, 1/(count+1)) = alpha for alpha >= 0.5); in a segment with
  T >= 2 anchor frames every member merges once into each anchor frame's most similar anchor.
  Cosine similarity picks the anchor (first anchor in score order on ties), raw tokens are
  averaged: anchor <- w*anchor + (1-w)*sum(members)/max(count, 1).
- anchor frames whose count equals n_c (every frame of a 1-frame segment, and degenerate cases
  such as p=2, L=3, n_c=1) merge only their own frame's tokens (the official single-frame path).

Deviations:
- counts are clamped so the official code's crashes become defined: at most F-1 cuts (official
  topk raises when c-1 > F-1, e.g. F=1); at most M anchors per anchor frame (official raises
  when floor(n_c*L/T) > M, about r > 0.83); kNN k capped at M (official raises when M < 4);
  n >= 1 (official keeps no video token when 196*r < 1).
- decisions and merges in float32 (official: the model dtype for the head and merges; cdist in
  fp32); output in the input dtype. Distances use clustering.py's matmul form.
- ties: the smallest similarities (cuts), saliency and density scores go to the lower index
  (official torch.topk: unspecified). The density's 1e-6 tie-break noise is drawn from the run's
  seeded generator, one (A, M) draw for the A anchor frames in frame order (official: unseeded,
  for every frame); scores are computed only on anchor frames (official computes all frames
  and uses the anchor frames' scores: same result).
- zero tokens: cosine 0 to everything (official divides by a zero norm: NaN); a zero member
  joins the first anchor.
- the head is loaded from files here (methods are otherwise file-free): only its weights and
  post_layernorm's are read from the checkpoint, once per process and device, float32.

Vectorised: the density-peak scores of all anchor frames are one batch; merge units (segments, or
single anchor frames) of the same shape are one batch, so the only Python loops are over distinct
unit shapes and over the T anchor frames of a shape (T = ceil(L/p)), never over tokens. The plan
(segments, anchor counts) is host-side integers: one device sync per video.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from methods import register
from methods.core.base import (
    Compressor,
    RetentionKnob,
    VideoTokens,
    VisualInput,
    cosine_threshold,
    fraction,
    knob,
    share,
)
from methods.core.clustering import density_peaks
from methods.core.select import top_k
from methods.core.similarity import cosine, normalized, segments_from_cuts
from methods.topk import pooled_scores

__all__ = ["budgets", "segment_bounds", "anchor_plan", "fastvid_compress", "load_siglip_head",
           "siglip_head_outputs", "FastVID"]

KNN = 4  # official density neighbours (self included)


# ----------------------------------------------------------------------------------------------
# The algorithm


def budgets(tokens_per_frame: int, retention: float, context_share: float) -> tuple[int, int, int]:
    """(n, n_c, n_s) per frame: n = int(N*r) (at least 1), n_c = int(n*d), n_s = n - n_c."""
    n = max(1, int(tokens_per_frame * retention))
    n_c = int(n * context_share)
    return n, n_c, n - n_c


def segment_bounds(global_features: torch.Tensor, segments: int, seg_tau: float) -> list[tuple[int, int]]:
    """DySeg: (F, C) global features -> [(start, end), ...]. Cut after the c-1 smallest cosines of
    consecutive frames (ties: earlier frame) and after every cosine below seg_tau."""
    frames = global_features.shape[0]
    sims = cosine(global_features[:-1], global_features[1:])  # (F-1,)
    cuts = sims < seg_tau
    k = min(segments - 1, frames - 1)
    cuts[torch.sort(sims, stable=True).indices[:k]] = True
    return segments_from_cuts(cuts, frames)


@dataclass(frozen=True)
class MergeUnit:
    """Anchor frames that condense the non-salient tokens of frames [start, start + length)."""

    start: int
    length: int
    anchor_frames: tuple[int, ...]
    anchors: int  # anchors per anchor frame


def anchor_plan(bounds: list[tuple[int, int]], n_c: int, anchor_every: int,
                available: int) -> list[MergeUnit]:
    """The official anchor distribution: per segment of L frames, T = ceil(L/p) anchor frames
    ((L-1-i) % p == 0) with floor(n_c*L/T) anchors each (clamped to the `available` non-salient
    tokens). Anchors with exactly n_c take the single-frame path: they merge their own frame only."""
    if n_c == 0:
        return []
    units = []
    for start, end in bounds:
        length = end - start
        anchor_count = (n_c * length) // ((length + anchor_every - 1) // anchor_every)
        frames = tuple(start + i for i in range(length) if (length - 1 - i) % anchor_every == 0)
        if anchor_count == n_c:
            units += [MergeUnit(f, 1, (f,), n_c) for f in frames]
        else:
            units.append(MergeUnit(start, length, frames, min(anchor_count, available)))
    return units


@torch.no_grad()
def fastvid_compress(features: torch.Tensor, saliency: torch.Tensor, global_features: torch.Tensor,
                     retention: float = 0.10, segments: int = 8, seg_tau: float = 0.9,
                     context_share: float = 0.4, anchor_every: int = 4, merge_floor: float = 0.6,
                     generator: torch.Generator | None = None) -> VideoTokens:
    """Compress (F, N, D) features to VideoTokens (original order, original positions).

    saliency (F, N): per-token saliency on the feature grid; global_features (F, C): one vector
    per frame. `generator` draws the density tie-break noise (None: no noise).
    """
    frames, per_frame, dim = features.shape
    device = features.device
    _, n_c, n_s = budgets(per_frame, retention, context_share)
    rest = per_frame - n_s  # M non-salient tokens per frame
    flat = features.float().reshape(frames * per_frame, dim)

    # DySeg and the anchor distribution (host-side integers: one sync per video)
    bounds = segment_bounds(global_features.float(), segments, seg_tau)
    units = anchor_plan(bounds, n_c, anchor_every, rest)

    # ATS: the n_s most salient tokens of every frame stay as they are
    order = torch.sort(-saliency.float().to(device), dim=1, stable=True).indices
    salient = order[:, :n_s]
    offsets = torch.arange(frames, device=device)[:, None] * per_frame
    kept_positions = [(salient + offsets).flatten()]
    kept_tokens = [flat.index_select(0, kept_positions[0])]

    if units:
        # the non-salient tokens of every frame, ascending (the salient ones sort last)
        flag = torch.zeros(frames, per_frame, dtype=torch.uint8, device=device)
        flag.scatter_(1, salient, 1)
        rest_index = torch.sort(flag, dim=1, stable=True).indices[:, :rest] + offsets  # (F, M) flat
        rest_tokens = flat.index_select(0, rest_index.flatten()).view(frames, rest, dim)

        # density-peak scores of every anchor frame, in one batch
        anchor_frames = sorted({f for u in units for f in u.anchor_frames})
        row = {f: i for i, f in enumerate(anchor_frames)}
        peaks = density_peaks(_frames_of(rest_tokens, anchor_frames), KNN, generator)
        ranked = top_k(peaks.score, max(u.anchors for u in units))  # (A, K_max) into M

        # DTM: units of equal shape (span, anchor frames, anchors) merge in one batch
        shapes: dict[tuple[int, int, int], list[MergeUnit]] = {}
        for u in units:
            shapes.setdefault((u.length, len(u.anchor_frames), u.anchors), []).append(u)
        for (length, anchor_count, k), group in shapes.items():
            tokens, positions = _merge(group, length, anchor_count, k, rest_tokens, rest_index,
                                       ranked, row, merge_floor)
            kept_tokens.append(tokens)
            kept_positions.append(positions)

    positions = torch.cat(kept_positions)
    positions, perm = positions.sort()
    tokens = torch.cat(kept_tokens)[perm]
    return VideoTokens(tokens.to(features.dtype), positions)


def _frames_of(x: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """x[frames] for ascending frame indices: a view when they are consecutive, else a copy."""
    if frames == list(range(frames[0], frames[0] + len(frames))):
        return x[frames[0]:frames[0] + len(frames)]
    return x.index_select(0, torch.tensor(frames, device=x.device))


def _merge(group: list[MergeUnit], length: int, anchor_count: int, k: int, rest_tokens: torch.Tensor,
           rest_index: torch.Tensor, ranked: torch.Tensor, row: dict,
           merge_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S units of the same shape: members = every non-salient token of the unit's frames,
    each assigned (cosine) to its nearest anchor of every anchor frame of the unit.

    Members are not normalised: a member's cosines to the anchors share its norm as a positive
    factor, so the argmax is the cosine's."""
    device = rest_tokens.device
    size, members_per_frame, dim = len(group), rest_tokens.shape[1], rest_tokens.shape[2]
    span = [u.start + i for u in group for i in range(length)]  # ascending: units are disjoint
    members = _frames_of(rest_tokens, span).reshape(size, length * members_per_frame, dim)

    anchor_frames = torch.tensor([u.anchor_frames for u in group], device=device)  # (S, T)
    rows = torch.tensor([[row[f] for f in u.anchor_frames] for u in group], device=device)
    picked = ranked[rows][..., :k]  # (S, T, K): indices into each anchor frame's M tokens
    anchors = rest_tokens[anchor_frames[..., None], picked].view(size, anchor_count * k, dim)

    sims = torch.bmm(members, normalized(anchors).mT).view(size, -1, anchor_count, k)
    label = sims.argmax(-1)  # (S, L*M, T): first maximum = first anchor in score order
    label += torch.arange(size, device=device)[:, None, None] * (anchor_count * k)
    clusters = size * anchor_count * k
    sources = members.reshape(-1, dim)
    sums = torch.zeros(clusters, dim, device=device)
    for t in range(anchor_count):  # every member once into each anchor frame's anchors
        sums.index_add_(0, label[..., t].flatten() + t * k, sources)
    counts = torch.bincount((label + torch.arange(anchor_count, device=device) * k).flatten(),
                            minlength=clusters).float()[:, None]
    weight = (1.0 / (counts + 1)).clamp(min=merge_floor)
    merged = weight * anchors.reshape(clusters, dim) + (1 - weight) * sums / counts.clamp(min=1)
    return merged, rest_index[anchor_frames[..., None], picked].flatten()


# ----------------------------------------------------------------------------------------------
# The SigLIP attention-pooling head (official SigLipVisionAbstract)


class SiglipHead(nn.Module):
    """A SigLIP vision checkpoint's `post_layernorm` and attention-pooling `head`, nothing else."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.siglip.modeling_siglip import (
            SiglipMultiheadAttentionPoolingHead,
        )

        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(config)


_PARTS = ("head.", "post_layernorm.")


def _head_key(key: str) -> str | None:
    """The SiglipHead key of a checkpoint key of the vision model's head or post_layernorm:
    `head.*` (SiglipVisionModel, transformers 5) or `...vision_model.head.*` (SiglipModel, older
    SiglipVisionModel); None for anything else (the text model's head among them)."""
    rest = key.rsplit("vision_model.", 1)[-1]
    return rest if rest.startswith(_PARTS) else None


def _read_head_weights(path: Path) -> dict[str, torch.Tensor]:
    """Only the head's and post_layernorm's tensors, from safetensors (single or sharded) or a
    pytorch_model.bin."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({file for key, file in weight_map.items() if _head_key(key)})
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = []
    state = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for key in f.keys():
                if (name := _head_key(key)) is not None:
                    state[name] = f.get_tensor(key)
    if not files and (path / "pytorch_model.bin").is_file():
        full = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        state = {name: t for key, t in full.items() if (name := _head_key(key)) is not None}
    if not files and not state:
        raise FileNotFoundError(f"fastvid.siglip_path={str(path)!r}: no model.safetensors(.index.json) "
                                "or pytorch_model.bin")
    return state


@functools.lru_cache(maxsize=4)
def load_siglip_head(path: str, device: str = "cpu") -> SiglipHead:
    """The post_layernorm + attention-pooling head of the SigLIP vision checkpoint at `path`
    (a SiglipVisionModel or SiglipModel directory), float32, on `device`; cached per process."""
    from transformers import SiglipVisionConfig

    config = SiglipVisionConfig.from_pretrained(path)
    if not getattr(config, "vision_use_head", True):
        raise ValueError(f"fastvid.siglip_path={path!r}: the checkpoint has no attention-pooling head "
                         "(vision_use_head=False)")
    with torch.device("meta"):  # no initialisation (and no draw from the global RNG)
        module = SiglipHead(config)
    state = _read_head_weights(Path(path))
    expected = set(module.state_dict())
    if set(state) != expected:
        raise ValueError(f"fastvid.siglip_path={path!r}: expected the head's weights "
                         f"{sorted(expected)}, found {sorted(state)}")
    module.load_state_dict(state, strict=True, assign=True)
    return module.float().to(device).eval().requires_grad_(False)


@torch.no_grad()
def siglip_head_outputs(encoder_hidden: torch.Tensor, head: SiglipHead) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, P, C) projector inputs -> (global (F, C), attention (F, P)): post_layernorm, then the
    head's probe attention (weights averaged over heads, as nn.MultiheadAttention returns them),
    then the head's residual MLP; the pooled output is the global feature (official)."""
    hidden = head.post_layernorm(encoder_hidden.float())
    pool = head.head
    probe = pool.probe.expand(hidden.shape[0], -1, -1)
    out, weights = pool.attention(probe, hidden, hidden, need_weights=True, average_attn_weights=True)
    out = out + pool.mlp(pool.layernorm(out))
    return out[:, 0], weights[:, 0]


# ----------------------------------------------------------------------------------------------
# The compressor


@register
@dataclass
class FastVID(Compressor):
    """`+method=fastvid retention=0.1 [method.siglip_path=<SigLIP checkpoint dir>]`."""

    name = "fastvid"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    label_knobs = ("retention",)
    # the union; each instance asks only for what its head uses (set in __post_init__)
    needs = frozenset({"patch_scores", "encoder_hidden"})
    retention: float = fraction(0.10, "share of each frame's tokens kept (before merging)")
    segments: int = knob(8, "at least this many segments (cut at the least similar frames)", kind="integer", low=1)
    seg_tau: float = cosine_threshold(0.9, "cut between frames whose global features' cosine is below this")
    context_share: float = share(0.4, "share of each frame's budget given to merged context tokens")
    anchor_every: int = knob(4, "one anchor frame every this many frames of a segment", kind="integer", low=1)
    merge_floor: float = share(0.6, "least weight of an anchor in its merge")
    siglip_path: str | None = knob(None, "a SigLIP vision checkpoint whose attention-pooling head gives "
                                   "the global features and saliency (null: the fallback head)",
                                   kind="text", optional=True)

    def validate(self):
        if self.siglip_path is not None and not os.path.isdir(self.siglip_path):
            raise ValueError(f"fastvid.siglip_path={self.siglip_path!r}: expected null (fallback head) "
                             "or the directory of a SigLIP vision checkpoint with its head")
        self.needs = frozenset({"patch_scores"} if self.siglip_path is None else {"encoder_hidden"})

    @property
    def head(self) -> str:
        """Which head gave the global features and saliency: "fallback" or the checkpoint path."""
        return "fallback" if self.siglip_path is None else self.siglip_path

    def notes(self) -> dict:
        return {"fastvid_head": self.head}

    def compress(self, x: VisualInput) -> VideoTokens:
        if self.siglip_path is None:
            if x.patch_scores is None:
                raise ValueError("fastvid (fallback head) needs the encoder's patch attention (patch_scores)")
            saliency = pooled_scores(x.patch_scores, x.grid, x.patch_grid)
            global_features = x.features.float().mean(1)
        else:
            if x.encoder_hidden is None:
                raise ValueError("fastvid with siglip_path needs the projector's input (encoder_hidden)")
            head = load_siglip_head(self.siglip_path, str(x.encoder_hidden.device))
            if x.encoder_hidden.shape[-1] != head.post_layernorm.normalized_shape[0]:
                raise ValueError(f"fastvid.siglip_path={self.siglip_path!r}: its head takes "
                                 f"{head.post_layernorm.normalized_shape[0]}-d features, the encoder "
                                 f"gives {x.encoder_hidden.shape[-1]}-d")
            global_features, attention = siglip_head_outputs(x.encoder_hidden, head)
            saliency = pooled_scores(attention, x.grid, x.patch_grid)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return fastvid_compress(x.features, saliency, global_features, self.retention, self.segments,
                                self.seg_tau, self.context_share, self.anchor_every, self.merge_floor,
                                generator)
