"""Density-peak clustering with k-nearest-neighbour density (DPC-kNN), shared by every method.

The form is TCFormer's `cluster_dpc_knn` as PruneVid, HoliTom and FastVID use it
(Visual-AI/PruneVid `models/pllava/modeling_pllava.py`, cokeshao/HoliTom `llava/model/llava_arch.py`,
LunarShen/FastVID): for tokens x (n, C) of one group,
  d_ij    = ||x_i - x_j|| / sqrt(C)                          (float32)
  rho_i   = exp(-mean of d_ij^2 over the k nearest j, i itself included) + 1e-6 * u_i
  delta_i = min d_ij over the j with rho_j > rho_i  (the densest: the largest d in the group)
  score_i = rho_i * delta_i
Centres are the highest scores; methods differ only in how they assign and merge around them
(each method file does that part).

Deviations from the official code, the same for every method: the 1e-6 tie-break noise u is drawn
from a generator seeded by the run (official: the global RNG, so official results vary run to run),
on the CPU in float32 and then moved, so CPU and GPU draw the same; distances use the matmul form
|a|^2 + |b|^2 - 2ab (clamped at 0, exact zero diagonal, made exactly symmetric so that mutual
nearest neighbours get equal densities and the noise, not round-off, orders them, as with
torch.cdist's direct form), which differs from the direct form by float rounding only; ties in
the top-k of scores go to the lower index.
Every function is batched over a leading group dimension (frames, windows): no Python loop over
tokens or groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOISE = 1e-6  # the official tie-break noise on the density


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """(B, n, C) -> (B, n, n) float32 Euclidean distances divided by sqrt(C)."""
    x = x.float()
    sq = (x * x).sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * (x @ x.transpose(1, 2))).clamp_(min=0)
    d2 = torch.minimum(d2, d2.transpose(1, 2))  # exactly symmetric (x_i.x_j, x_j.x_i may round apart)
    d2.diagonal(dim1=1, dim2=2).zero_()
    return d2.sqrt_().div_(x.shape[-1] ** 0.5)


@dataclass
class DensityPeaks:
    distance: torch.Tensor  # (B, n, n)
    density: torch.Tensor  # (B, n), with the tie-break noise
    delta: torch.Tensor  # (B, n) distance to the nearest denser token
    score: torch.Tensor  # (B, n) density * delta


def density_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """The 1e-6-scaled uniform tie-break noise, drawn on the CPU so every device draws the same."""
    if generator is None:
        return torch.zeros(shape, device=device)
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * NOISE).to(device)


def density_peaks(x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                  distance: torch.Tensor | None = None) -> DensityPeaks:
    """DPC-kNN scores of every token of every group: x (B, n, C); k nearest neighbours (self
    included, capped at n). Without a generator no noise is added (exact ties stay ties)."""
    dist = pairwise_distance(x) if distance is None else distance
    batch, n, _ = dist.shape
    nearest = dist.topk(min(k, n), dim=-1, largest=False).values
    density = (-(nearest * nearest).mean(-1)).exp() + density_noise((batch, n), generator, dist.device)
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: rho_j > rho_i
    far = dist.flatten(1).amax(-1)[:, None, None]
    delta = torch.where(denser, dist, far).amin(-1)
    return DensityPeaks(dist, density, delta, density * delta)


def assign_to_centres(distance: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, n) index into `centres` of each token's nearest centre (ties: the first centre); every
    centre belongs to its own cluster."""
    to_centres = distance.gather(1, centres[:, :, None].expand(-1, -1, distance.shape[-1]))
    label = to_centres.argmin(dim=1)  # (B, n)
    label.scatter_(1, centres, torch.arange(centres.shape[1], device=label.device).expand_as(centres))
    return label


def cluster_mean(x: torch.Tensor, label: torch.Tensor, clusters: int) -> torch.Tensor:
    """(B, n, C) tokens, (B, n) labels -> (B, clusters, C) unweighted mean of each cluster's members
    (0 for an empty cluster), computed in float32."""
    batch, _, channels = x.shape
    sums = torch.zeros(batch, clusters, channels, device=x.device, dtype=torch.float32)
    sums.scatter_add_(1, label[:, :, None].expand(-1, -1, channels), x.float())
    counts = torch.zeros(batch, clusters, device=x.device, dtype=torch.float32)
    counts.scatter_add_(1, label, torch.ones_like(label, dtype=torch.float32))
    return sums / counts.clamp(min=1)[:, :, None]


def merge_into_centres(x: torch.Tensor, label: torch.Tensor, centres: torch.Tensor,
                       centre_weight) -> torch.Tensor:
    """(B, n, C) tokens, (B, n) labels (an index into `centres`, as `assign_to_centres` gives),
    (B, k) centre indices -> (B, k, C) float32 `w * centre + (1 - w) * mean(other members)`.

    The mean is over the cluster's members other than its centre; a centre with no other member
    stays as it is (w = 1). `centre_weight` is a number (HoliTom: beta) or a function of the (B, k)
    counts of other members giving w (FastVID: max(alpha, 1 / (count + 1))).
    """
    batch, n, channels = x.shape
    clusters = centres.shape[1]
    flat = x.reshape(batch * n, channels).float()
    is_centre = torch.zeros(label.shape, dtype=torch.bool, device=x.device).scatter_(1, centres, True)
    slot = torch.where(is_centre, clusters, label)  # centres go to a spare slot, dropped below
    slot = (slot + torch.arange(batch, device=x.device)[:, None] * (clusters + 1)).flatten()
    # index_add_ over rows (not scatter_add_ over an expanded index: several times faster on CPU)
    sums = torch.zeros(batch * (clusters + 1), channels, device=x.device, dtype=torch.float32)
    sums.index_add_(0, slot, flat)
    counts = torch.zeros(batch * (clusters + 1), device=x.device, dtype=torch.float32)
    counts.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float32))
    sums = sums.view(batch, clusters + 1, channels)[:, :clusters]
    counts = counts.view(batch, clusters + 1)[:, :clusters]
    weight = centre_weight(counts) if callable(centre_weight) else torch.full_like(counts, centre_weight)
    weight = torch.where(counts > 0, weight, 1.0)[:, :, None]
    rows = (centres + torch.arange(batch, device=x.device)[:, None] * n).flatten()
    centre = flat.index_select(0, rows).view(batch, clusters, channels)
    return weight * centre + (1 - weight) * (sums / counts.clamp(min=1)[:, :, None])
