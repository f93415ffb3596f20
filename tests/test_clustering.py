"""The shared density-peak clustering (methods/core/clustering.py) against a literal loop reference."""

import math

import pytest
import torch

from methods.core.clustering import (
    assign_to_centres,
    cluster_mean,
    density_peaks,
    pairwise_distance,
)
from methods.core.select import top_k
from methods.core.similarity import same_position_similarity, segments_from_cuts
from tests.helpers.tolerance import bound, close


def gram_bound(x: torch.Tensor) -> float:
    """How far float32 |x_i|^2 + |x_j|^2 - 2 x_i.x_j (over C channels) may be from the exact
    squared distance, divided by C as pairwise_distance divides: each of its terms is within 2·γ_C
    of its magnitude, together at most 4·max|x|^2 (the difference cancels, so the bound is on the
    squares, not relative to the distance)."""
    channels = x.shape[-1]
    return bound(torch.float32, channels, depth=2) * 4 * float(x.double().pow(2).sum(-1).max()) / channels


def literal_dpc(x, k):
    """TCFormer's cluster_dpc_knn for one group, in float64 loops, no noise."""
    n, c = len(x), len(x[0])
    d = [[math.sqrt(sum((x[i][t] - x[j][t]) ** 2 for t in range(c))) / math.sqrt(c) for j in range(n)]
         for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:min(k, n)]) / min(k, n)) for i in range(n)]
    far = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(n) if rho[j] > rho[i]], default=far) for i in range(n)]
    return d, rho, delta, [rho[i] * delta[i] for i in range(n)]


@pytest.mark.parametrize("n, c, k, seed", [(12, 5, 4, 0), (30, 8, 7, 1), (3, 4, 7, 2)])
def test_density_peaks_equal_the_literal_formula(n, c, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, c, generator=g)
    peaks = density_peaks(x, k)
    for b in range(2):
        d, rho, delta, score = literal_dpc(x[b].double().tolist(), k)
        d, rho, delta, score = (torch.tensor(v, dtype=torch.float64) for v in (d, rho, delta, score))
        # float32 (Gram form) against the float64 loops: squared distances within gram of each other
        # (tests/helpers/tolerance.py); the density's exponent, a mean of k of them, moves by at most
        # that much, a relative change of the density; the score is density * delta
        gram = gram_bound(x[b])
        exponent = float(-rho.log().max())
        rel = gram + bound(torch.float32, k, depth=2) * exponent  # the mean of k, then exp
        torch.testing.assert_close(peaks.distance[b].double() ** 2, d ** 2, rtol=bound(torch.float32, c), atol=gram)
        torch.testing.assert_close(peaks.density[b].double(), rho, rtol=rel, atol=0)
        torch.testing.assert_close(peaks.delta[b].double() ** 2, delta ** 2, rtol=bound(torch.float32, c), atol=gram)
        torch.testing.assert_close(peaks.score[b].double() ** 2, score ** 2, rtol=2 * rel, atol=gram)


def test_centres_are_the_top_k_and_tokens_go_to_the_nearest():
    g = torch.Generator().manual_seed(3)
    # three well separated blobs: their densest points are the centres
    blobs = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (blobs.repeat_interleave(6, 0) + 0.3 * torch.randn(18, 2, generator=g))[None]
    peaks = density_peaks(x, 4)
    centres = top_k(peaks.score, 3)
    assert sorted((centres[0] // 6).tolist()) == [0, 1, 2]  # one centre per blob
    label = assign_to_centres(peaks.distance, centres)
    for i in range(18):
        assert (centres[0, label[0, i]] // 6).item() == i // 6
    assert label[0, centres[0]].tolist() == [0, 1, 2]
    means = cluster_mean(x, label, 3)
    for c in range(3):
        members = x[0, label[0] == c]
        # a scatter-add mean against torch's mean: two sums of at most 18 members
        torch.testing.assert_close(means[0, c], members.mean(0), **close(torch.float32, 18))


def test_noise_is_seeded_and_breaks_exact_ties():
    x = torch.zeros(1, 5, 3)  # every density ties
    plain = density_peaks(x, 3)
    assert torch.equal(plain.density, torch.ones(1, 5))
    a = density_peaks(x, 3, torch.Generator().manual_seed(0))
    b = density_peaks(x, 3, torch.Generator().manual_seed(0))
    assert torch.equal(a.density, b.density) and len(set(a.density[0].tolist())) > 1
    assert float((a.density - 1).abs().max()) < 1e-6 + 1e-7


def test_distance_has_an_exact_zero_diagonal_and_is_symmetric():
    x = torch.randn(3, 40, 16) * 100
    d = pairwise_distance(x)
    assert torch.equal(d.diagonal(dim1=1, dim2=2), torch.zeros(3, 40))
    assert torch.equal(d, d.transpose(1, 2))  # made symmetric by construction: exact
    # the Gram form against cdist's direct differences (float32, 16 channels): squared distances
    # within gram_bound of each other
    direct = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / 4
    torch.testing.assert_close(d.double() ** 2, direct.double() ** 2, rtol=bound(torch.float32, 16, depth=2),
                               atol=gram_bound(x))


def test_frame_helpers():
    x = torch.randn(4, 6, 8)
    sim = same_position_similarity(x)
    assert sim.shape == (3, 6)
    # two cosine kernels: a dot product and norms over 8 channels, then the quotient
    torch.testing.assert_close(sim[1, 2], torch.nn.functional.cosine_similarity(x[1, 2], x[2, 2], dim=0),
                               **close(torch.float32, 8, depth=2))
    assert segments_from_cuts(torch.tensor([False, True, False, True]), 5) == [(0, 2), (2, 4), (4, 5)]
    assert segments_from_cuts(torch.zeros(0, dtype=torch.bool), 1) == [(0, 1)]
