"""A deliberately literal restatement of ToMe (Bolya et al., ICLR 2023, arXiv:2210.09461), in float64.

For tests and benchmarks only; it does not import methods/. Line by line the official code at
facebookresearch/ToMe commit af95e4b: `tome/merge.py::{bipartite_soft_matching, merge_wavg,
merge_source}`, `tome/utils.py::parse_r`, and `tome/patch/timm.py::{ToMeBlock.forward,
ToMeAttention.forward, ToMeVisionTransformer.forward}` written out on the modules of a SigLIP encoder
layer (layer_norm1, q/k/v/out projections, layer_norm2, mlp) instead of timm's Block, with
trace_source on. What differs from the official text, each marked "harness:" where it is:
- the descending sort of the similarities is stable (ties to the lower index); the official argsort
  leaves tie order to the backend (torch.max takes the first maximum on the CPU, as argmax does);
- the encoder's output is put in the order of each token's smallest original patch (its source's
  first patch), this harness's order for LLaVA-OneVision;
- the inputs are cast to float64 (the caller gives a float64 copy of the encoder).
"""

from __future__ import annotations

import math
from typing import Callable, List, Tuple, Union

import torch


def do_nothing(x, mode=None):
    return x


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
) -> Tuple[Callable, Callable]:
    metric = metric.double()
    protected = 0
    if class_token:
        protected += 1
    if distill_token:
        protected += 1

    # We can only reduce by a maximum of 50% tokens
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)

    if r <= 0:
        return do_nothing, do_nothing

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)

        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]  # harness: stable

        unm_idx = edge_idx[..., r:, :]  # Unmerged Tokens
        src_idx = edge_idx[..., :r, :]  # Merged Tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

        if class_token:
            # Sort to ensure the class token is at the start
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode="mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)

        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        else:
            return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        n, _, c = unm.shape

        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))

        out = torch.zeros(n, metric.shape[1], c, device=x.device, dtype=x.dtype)

        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)

        return out

    return merge, unmerge


def merge_wavg(
    merge: Callable, x: torch.Tensor, size: torch.Tensor = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    if size is None:
        size = torch.ones_like(x[..., 0, None])

    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")

    x = x / size
    return x, size


def merge_source(
    merge: Callable, x: torch.Tensor, source: torch.Tensor = None
) -> torch.Tensor:
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=torch.float64)[None, ...].expand(n, t, t)

    source = merge(source, mode="amax")
    return source


def parse_r(num_layers: int, r: Union[List[int], Tuple[int, float], int]) -> List[int]:
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    elif isinstance(r, tuple):
        r, inflect = r

    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)

    return [int(min_val + step * i) for i in range(num_layers)]


def tome_attention(attn, x: torch.Tensor, size: torch.Tensor = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToMeAttention.forward on a SiglipAttention's projections (q_proj, k_proj, v_proj, out_proj)."""
    B, N, C = x.shape
    heads = attn.num_heads
    q = attn.q_proj(x).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)

    attn_scores = (q @ k.transpose(-2, -1)) * attn.scale

    # Apply proportional attention
    if size is not None:
        attn_scores = attn_scores + size.log()[:, None, None, :, 0]

    attn_scores = attn_scores.softmax(dim=-1)

    x = (attn_scores @ v).transpose(1, 2).reshape(B, N, C)
    x = attn.out_proj(x)

    # Return k as well here
    return x, k.mean(1)


def tome_block(layer, x: torch.Tensor, info: dict) -> torch.Tensor:
    """ToMeBlock.forward on a SiglipEncoderLayer (norm1 = layer_norm1, attn = self_attn, norm2 =
    layer_norm2, mlp = mlp; no drop path at inference)."""
    attn_size = info["size"] if info["prop_attn"] else None
    x_attn, metric = tome_attention(layer.self_attn, layer.layer_norm1(x), attn_size)
    x = x + x_attn

    r = info["r"].pop(0)
    if r > 0:
        # Apply ToMe here
        merge, _ = bipartite_soft_matching(metric, r, info["class_token"], info["distill_token"])
        if info["trace_source"]:
            info["source"] = merge_source(merge, x, info["source"])
        x, info["size"] = merge_wavg(merge, x, info["size"])

    x = x + layer.mlp(layer.layer_norm2(x))
    return x


def tome_encoder(vision, pixels: torch.Tensor, r, depth: int, prop_attn: bool = True,
                 class_token: bool = False):
    """ToMeVisionTransformer.forward on a float64 SigLIP vision model: the embeddings, then its first
    `depth` layers as ToMe blocks. Returns (tokens in the order of their smallest source patch (harness),
    that patch index, sizes in the same order, the final source matrix)."""
    info = {"r": parse_r(depth, r), "size": None, "source": None, "trace_source": True,
            "prop_attn": prop_attn, "class_token": class_token, "distill_token": False}
    x = vision.embeddings(pixels.double())
    for layer in vision.encoder.layers[:depth]:
        x = tome_block(layer, x, info)
    n, t, _ = x.shape
    source = info["source"]
    size = info["size"] if info["size"] is not None else torch.ones(n, t, 1, dtype=torch.float64)
    if source is None:
        source = torch.eye(t, dtype=torch.float64)[None].expand(n, t, t)
    first = torch.stack([torch.tensor([int(row.nonzero()[0]) for row in source[b]]) for b in range(n)])
    order = first.argsort(dim=-1)  # harness: the order of the smallest source patch
    gather = order[..., None]
    return (x.gather(1, gather.expand(-1, -1, x.shape[-1])), first.gather(1, order), size.gather(1, gather),
            source.gather(1, gather.expand(-1, -1, source.shape[-1])))
