"""VidCom2: keep, per frame, the tokens least like their video and frame centres, with a budget per frame.

Tokens are scored by multi-scale Gaussian similarity to the video's and the frame's mean (on the
half of the channels with the lowest variance); frames unlike the rest get a larger share of the
budget; each frame keeps its least typical tokens unchanged, in original order. Attention-free.

Paper: Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large
Language Models" (VidCom2), EMNLP 2025, arXiv:2505.14454. Official code followed: xuyang-liu16/VidCom2,
read at commit 944a17d, `token_compressor/vidcom2/vidcom2.py` (`vidcom2_compression` with
model="llava_ov"), inserted as `token_compressor/models/llava.py` does: on the projected, 2x2-pooled
(F*196, D) features, before the single trailing newline. The method in five steps: (1) the
lowest-variance half of the channels, (2) normalised rows and the video / frame centres, (3) the
multi-scale Gaussian similarity v, f to each centre, (4) per-frame budgets from a softmax over the
frames' uniqueness, (5) per frame the lowest v + f. The formulas are the official ones; in the
details this module does what the official code does:
- variance over all F*N tokens is the population variance (`unbiased=False`); the kept channels
  are the `int(D * 0.5)` lowest; rows are L2-normalised after the channel selection with
  `F.normalize` (divide by max(norm, 1e-12)); the centres are plain means of normalised rows (not
  re-normalised); v and f sum the five kernels in the order alpha = 1/8, 1/4, 1/2, 1, 2;
- `k_f = max(1, round(s_f * N))` rounds half to even (`torch.round`, like Python's `round`); the
  kept total is the sum of the per-frame counts, so rho_tok is close to, not exactly, r;
- the kept tokens take consecutive positions (a plain (M, D) output): the official code splices
  them into the sequence and renumbers positions.
Deviations:
- decisions (variance, scores, softmax, budgets) are computed in float32 (float64 for float64
  input); the official code runs in the model dtype (fp16/bf16), where the 0.01-temperature
  softmax and `s_f * 196` can round differently. The output rows are the input's, unchanged.
  Same arithmetic, different evaluation order (VidCom2 is memory-bound; see gaussian_scores): the
  variance from blocked shifted sums, and ||y - c||^2 = ||y||^2 - 2 y.c + ||c||^2 from products
  instead of explicit differences; in float32 these differ from the direct forms by ~1e-6
  relative, which moves only decisions that close to a tie (the fp16/bf16 official: ~1e-3).
- exact halves of `s_f * 196` are common when the softmax saturates (p one-hot: s_f = r(2 - 1/F)
  or r(1 - 1/F)), and round-off in the last bit decides them, here as in the official code.
- ties are broken stably, lower index first: among equal-variance channels at the cut and among
  equal `v + f` scores at a frame's cut (official `torch.topk(..., sorted=False)`: unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register
from methods.core.base import Compressor, RetentionKnob, VisualInput, fraction
from methods.core.similarity import checked_features, compute_dtype

__all__ = ["ALPHAS", "TEMPERATURE", "frame_budgets", "gaussian_scores", "vidcom2_compress",
           "vidcom2_keep"]

ALPHAS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)  # 2**k for k in -3..1
TEMPERATURE = 0.01
CHANNEL_SHARE = 0.5




def gaussian_scores(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, N, D) -> (v, f), each (F, N): steps 1-3 (similarity to the video / frame centre).

    Memory-bound, so written as three passes over X without X-sized temporaries: the channel
    variance (one pass in row blocks), the selected channels' norms with each frame's sum of
    normalised rows (one pass in frame blocks), and the token-centre products as one
    (F, N, D) x (F, D, 2) product with centres that are zero outside the selected channels;
    ||y - c||^2 = ||y||^2 - 2 y.c + ||c||^2 for the normalised rows y.
    """
    frames, per_frame, dim = features.shape
    x = features.to(compute_dtype(features.dtype))
    # 1. the int(D/2) channels of lowest population variance over all tokens (ties: lower index)
    variance = _channel_variance(x.reshape(frames * per_frame, dim))
    channels = torch.sort(variance, stable=True).indices[: int(dim * CHANNEL_SHARE)]
    mask = torch.zeros(dim, dtype=x.dtype, device=x.device).index_fill_(0, channels, 1.0)
    # 2. rows normalised on those channels as F.normalize does (divide by max(norm, 1e-12)); the
    # centres are plain means of the normalised rows
    norms, frame_sums = _norms_and_frame_sums(x, mask)
    inverse = 1 / norms.clamp_min(1e-12)
    unit_square = (norms * inverse).square_().unsqueeze(-1)  # ||y||^2: 1, or 0 for a zero row
    frame_centre = frame_sums.div_(per_frame).mul_(mask)  # (F, 1, D)
    video_centre = frame_centre.mean(dim=0, keepdim=True)  # frames are equal-sized: the mean of all
    centres = torch.cat([video_centre.expand(frames, 1, dim), frame_centre], dim=1)  # (F, 2, D)
    # 3. squared distances to both centres, then the multi-scale Gaussian kernels
    dots = torch.bmm(x, centres.mT).mul_(inverse.unsqueeze(-1))
    d2 = (unit_square - 2 * dots + centres.square().sum(-1)[:, None, :]).clamp_min_(0)
    total = torch.zeros_like(d2)
    for alpha in ALPHAS:
        total += torch.exp(-d2 / (2 * alpha))
    return total[..., 0], total[..., 1]


BLOCK = 2**21  # entries per block of a pass over X on CPU: temporaries stay in the last-level cache


def _block_rows(rows: int, row_size: int, device: torch.device) -> int:
    """Rows (of `row_size` entries) per block: ~BLOCK entries on CPU, all rows elsewhere."""
    return rows if device.type != "cpu" else max(1, min(rows, BLOCK // max(row_size, 1)))


def _channel_variance(flat: torch.Tensor) -> torch.Tensor:
    """(T, D) -> (D,) population variance over the rows, in one pass over row blocks.

    Each block is centred on its own first row (so squaring loses nothing to a large mean), its
    mean and sum of squared deviations taken, and blocks are combined exactly (Chan et al.):
    M2 = sum_b M2_b + sum_b n_b (mean_b - mean)^2.
    """
    rows, dim = flat.shape
    step = _block_rows(rows, dim, flat.device)
    count = (rows + step - 1) // step
    means = torch.empty(count, dim, dtype=flat.dtype, device=flat.device)
    m2 = torch.empty(count, dim, dtype=flat.dtype, device=flat.device)
    sizes = torch.empty(count, 1, dtype=flat.dtype, device=flat.device)
    block = torch.empty(min(step, rows), dim, dtype=flat.dtype, device=flat.device)
    for b, i in enumerate(range(0, rows, step)):
        rows_b = flat[i:i + step]
        n = rows_b.shape[0]
        part = block[:n]
        torch.sub(rows_b, rows_b[0], out=part)
        shifted_sum = part.sum(0)
        torch.sum(part.square_(), 0, out=m2[b])
        m2[b] -= shifted_sum.square() / n
        torch.add(rows_b[0], shifted_sum, alpha=1 / n, out=means[b])
        sizes[b] = n
    mean = (means * sizes).sum(0) / rows
    return (m2.sum(0) + ((means - mean).square_() * sizes).sum(0)) / rows


def _norms_and_frame_sums(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, N, D), (D,) 0/1 -> norms (F, N) of the rows on the masked channels, and (F, 1, D) each
    frame's sum of its rows divided by max(norm, 1e-12): one pass over frame blocks (the block is
    still in cache for the weighted sum)."""
    frames, per_frame, dim = x.shape
    step = _block_rows(frames, per_frame * dim, x.device)
    norms = torch.empty(frames, per_frame, dtype=x.dtype, device=x.device)
    sums = torch.empty(frames, 1, dim, dtype=x.dtype, device=x.device)
    block = torch.empty(min(step, frames), per_frame, dim, dtype=x.dtype, device=x.device)
    for i in range(0, frames, step):
        frames_b = x[i:i + step]
        part = block[: frames_b.shape[0]]
        torch.mul(frames_b, frames_b, out=part)
        norm = torch.matmul(part, mask).sqrt_()  # (b, N)
        norms[i:i + step] = norm
        torch.bmm((1 / norm.clamp_min(1e-12)).unsqueeze(1), frames_b, out=sums[i:i + step])
    return norms, sums


def frame_budgets(v: torch.Tensor, retention: float) -> torch.Tensor:
    """(F, N) video scores -> (F,) long: tokens each frame keeps, step 4 and step 5's count."""
    per_frame = v.shape[1]
    uniqueness = -v.mean(dim=-1)
    p = torch.softmax((uniqueness - uniqueness.max()) / TEMPERATURE, dim=0)
    share = (retention * (1 + p - p.mean())).clamp(max=1.0)
    return (share * per_frame).round().long().clamp(min=1)


@torch.no_grad()
def vidcom2_keep(features: torch.Tensor, retention: float) -> torch.Tensor:
    """(F, N, D) -> (F, N) bool: the tokens VidCom2 keeps (frame f keeps its k_f lowest v + f)."""
    VidCom2.check_knobs(retention=retention)
    x = checked_features(features)
    v, f = gaussian_scores(x)
    budget = frame_budgets(v, retention)
    score = v + f
    # rank of each token within its frame by ascending score, stable: lower index first on ties
    order = torch.sort(score, dim=-1, stable=True).indices
    ranks = torch.arange(x.shape[1], device=x.device).expand_as(order)
    return torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, ranks < budget[:, None])


@torch.no_grad()
def vidcom2_compress(features: torch.Tensor, retention: float = 0.25) -> torch.Tensor:
    """(F, N, D) -> (M, D): the kept rows of the features, frame-major, in original order."""
    keep = vidcom2_keep(features, retention)
    index = keep.flatten().nonzero().squeeze(1)  # the one host sync: the output's size
    return features.flatten(0, 1).index_select(0, index)


@register
@dataclass
class VidCom2(Compressor):
    """`+method=vidcom2 retention=0.25`: the official base scale, taken directly as the retention."""

    name = "vidcom2"
    stages = frozenset({"visual"})
    retention_knob = RetentionKnob("retention", direct=True)
    retention: float = fraction(0.25, "base share of tokens kept per frame (official base_scale)")

    def compress(self, x: VisualInput) -> torch.Tensor:
        return vidcom2_compress(x.features, self.retention)
