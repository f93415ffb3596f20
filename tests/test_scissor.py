"""methods/scissor.py against the method as its docstring states it and its literal restatement.

The literal implementation (tests/reference/scissor.py) runs in float64. In float64 both sides
make the same graph decisions unless a similarity lies within ~1e-15 of tau; in float32 the
implementation may flip a decision that lies within ~1e-6, so the float32 comparisons use inputs
whose float64 decisions are at least SAFE away from flipping.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from methods.scissor import (
    _min_label_components,
    sample_size,
    scissor_compress,
    semantic_connected_components,
)
from tests.helpers.tolerance import close
from tests.reference.scissor import (
    reference_code_style_scissor,
    reference_scc,
    reference_scissor,
)

GOLDEN = Path(__file__).parent / "golden" / "scissor_golden.pt"
SAFE = 1e-5


def clustered(frames: int, per_frame: int, dim: int, noise: float, seed: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tokens around a few shared centroids, with random norms: components of many sizes.

    Within a centroid cos is about 1/(1 + noise^2), so noise sets how much tau cuts apart.
    """
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(max(2, per_frame // 4), dim, generator=g, dtype=torch.float64)
    pick = torch.randint(0, centroids.shape[0], (frames, per_frame), generator=g)
    scale = 0.5 + torch.rand(frames, per_frame, 1, generator=g, dtype=torch.float64)
    x = (centroids[pick] + noise * torch.randn(frames, per_frame, dim, generator=g,
                                               dtype=torch.float64)) * scale
    return x.to(dtype)


def assert_same_output(y: torch.Tensor, expected: torch.Tensor, n: int) -> None:
    """y (computed in its dtype) against another computation of it, from n input tokens: a merged
    token is a component mean, then a mean with its members, at most n tokens summed each time
    (tests/helpers/tolerance.py)."""
    assert y.shape == expected.shape, f"M = {y.shape[0]}, expected {expected.shape[0]}"
    torch.testing.assert_close(y.double(), expected.double(), **close(y.dtype, n, depth=2))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Equivalence with the literal implementation

SHAPES = list(itertools.product([1, 2, 4], [4, 16, 49, 196], [8, 32]))
SETTINGS = [(0.1, 0.95), (0.3, 0.9), (0.6, 0.8), (1.0, 0.5), (0.3, 0.0), (0.45, 0.9)]


@pytest.mark.parametrize("frames,per_frame,dim", SHAPES)
def test_matches_literal_float64(frames, per_frame, dim):
    """Exact decisions: the same components, order and assignment as the literal spec."""
    for k, (noise, tau) in enumerate(SETTINGS[:3] if per_frame == 196 else SETTINGS):
        x = clustered(frames, per_frame, dim, noise, seed=100 * k + frames * per_frame + dim,
                      dtype=torch.float64)
        ref = reference_scissor(x, tau)
        assert min(ref.margin, ref.gap) > 1e-12, "input too close to a tie for float64"
        assert_same_output(scissor_compress(x, tau), ref.output, frames * per_frame)


@pytest.mark.parametrize("frames,per_frame,dim", [s for s in SHAPES if s[1] != 4])
def test_matches_literal_float32(frames, per_frame, dim):
    """float32 input, <= 1e-5 relative to the float64 literal result, components of all sizes."""
    checked = 0
    for seed in range(40):
        noise, tau = SETTINGS[seed % len(SETTINGS)]
        x = clustered(frames, per_frame, dim, noise, seed=seed)
        ref = reference_scissor(x, tau)
        if min(ref.margin, ref.gap) < SAFE:
            continue  # a decision float32 round-off may legitimately flip
        y = scissor_compress(x, tau)
        assert y.dtype == torch.float32
        assert_same_output(y, ref.output, frames * per_frame)
        checked += 1
        if checked == 2:
            return
    pytest.fail(f"only {checked} inputs with safe margins")


def test_component_labels_match_literal():
    for seed, (noise, tau) in enumerate(SETTINGS):
        x = clustered(1, 120, 16, noise, seed=seed, dtype=torch.float64)[0]
        labels, count = semantic_connected_components(x, tau)
        ref = reference_scc(x, tau, 0.05)
        assert count == len(ref.components)
        expected = torch.empty(x.shape[0], dtype=torch.long)
        for c, members in enumerate(ref.components):
            expected[members] = c
        assert torch.equal(labels, expected)


def test_components_are_transitive_and_ordered_by_max_degree():
    # Chain 0 - 3 - 4 (0 and 4 not adjacent: cos 40 deg < 0.9) plus two isolated tokens.
    a = math.radians(20)
    x = torch.tensor([[math.cos(a), math.sin(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                      [1, 0, 0, 0], [math.cos(a), -math.sin(a), 0, 0]], dtype=torch.float32)
    labels, count = semantic_connected_components(x, tau=0.9)
    # Keys: {1} -> 1, {2} -> 2, {0, 3, 4} -> 3 (degree 3); ordering by smallest member would
    # put the chain first.
    assert count == 3
    assert labels.tolist() == [2, 0, 1, 2, 2]
    y = scissor_compress(x[None], tau=0.9)
    chain = x[[0, 3, 4]].mean(0)
    # Merge: tokens 1 and 2 join their own singleton, tokens 0, 3, 4 join the chain's mean.
    expected = torch.stack([x[1], x[2], (chain + x[[0, 3, 4]].sum(0)) / 4])
    # the method's means against the arithmetic by hand (float32): a mean of 3, then of 4
    torch.testing.assert_close(y, expected, **close(torch.float32, 4, depth=2))


def test_degree_tie_goes_to_smallest_index():
    # {0, 3} adjacent (equal degrees 2): key 0; {1}, {2} isolated: order {0,3}, {1}, {2}.
    x = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1.0, -0.1, 0, 0]])
    labels, count = semantic_connected_components(x, tau=0.9)
    assert count == 3 and labels.tolist() == [0, 1, 2, 0]


def smallest_member_labels(adj: torch.Tensor) -> list[int]:
    """Each node's smallest component member, by breadth-first search over adj or adj.T."""
    n = adj.shape[0]
    sym = adj | adj.T
    labels = [-1] * n
    for start in range(n):
        if labels[start] < 0:
            labels[start], frontier = start, [start]
            while frontier:
                node = frontier.pop()
                for other in torch.nonzero(sym[node]).flatten().tolist():
                    if labels[other] < 0:
                        labels[other] = start
                        frontier.append(other)
    return labels


@pytest.mark.parametrize("step", [1, 7, 50])
@pytest.mark.parametrize("one_way", [False, True])
def test_label_propagation_in_row_blocks(step, one_way):
    """Any row-block size gives the components; an edge stored one way counts both ways."""
    g = seeded(step)
    adj = torch.rand(3, 50, 50, generator=g) < torch.tensor([0.005, 0.03, 0.2])[:, None, None]
    adj = adj.triu(1) if one_way else adj | adj.mT
    adj.diagonal(dim1=-2, dim2=-1).fill_(True)
    labels = _min_label_components(adj.clone(), step)
    for b in range(3):
        assert labels[b].tolist() == smallest_member_labels(adj[b])


def test_components_of_many_tokens_match_literal():
    # n = 1500 > 1024: the adjacency is processed in several row blocks on CPU.
    x = clustered(1, 1500, 16, 0.45, seed=13, dtype=torch.float64)[0]
    labels, count = semantic_connected_components(x, 0.9)
    ref = reference_scc(x, 0.9, 0.05)
    assert count == len(ref.components)
    for c, members in enumerate(ref.components):
        assert (labels[members] == c).all()


# ----------------------------------------------------------------------------------------------
# Edge cases


def test_single_frame_single_token():
    x = torch.randn(1, 1, 8)
    y = scissor_compress(x, 0.9)
    assert torch.equal(y, x[0])


def test_single_frame():
    x = clustered(1, 49, 16, 0.3, seed=3, dtype=torch.float64)
    assert_same_output(scissor_compress(x, 0.9), reference_scissor(x, 0.9).output, 4)


def test_identical_tokens_give_one_token():
    v = torch.randn(32)
    x = v.expand(4, 49, 32).clone()
    for tau in (-1.0, 0.0, 0.9, 0.999):
        y = scissor_compress(x, tau)
        assert y.shape == (1, 32)
        # float32 means of 4 * 49 copies of v against v: a component mean, then a mean with members
        torch.testing.assert_close(y[0], v, **close(torch.float32, 4 * 49, depth=2))


def test_orthogonal_tokens_are_kept_in_order():
    # Nothing merges: T = X in frame-then-token order and each token joins only itself.
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=seeded(1), dtype=torch.float64))
    x = (q * torch.linspace(0.5, 3.0, 24, dtype=torch.float64)[:, None]).float().reshape(3, 8, 24)
    for tau in (0.1, 0.5, 0.9):
        # each token merges only with itself, (x + x) / 2 = x in any order: exact
        torch.testing.assert_close(scissor_compress(x, tau), x.reshape(24, 24), rtol=0, atol=0)
    # Axis-aligned tokens have cosine exactly 0: not > 0, so even tau = 0 keeps them apart.
    axes = torch.diag(torch.arange(1.0, 17.0))[torch.randperm(16, generator=seeded(2))]
    assert torch.equal(scissor_compress(axes.reshape(2, 8, 16), 0.0), axes)


@pytest.mark.parametrize("tau", [-0.5, 0.0, 0.7])
def test_zero_vectors(tau):
    x = clustered(3, 16, 8, 0.3, seed=5, dtype=torch.float64)
    x[0, 2] = 0
    x[1, :5] = 0
    x[2, 15] = 0
    ref = reference_scissor(x, tau)
    y = scissor_compress(x, tau)
    assert_same_output(y, ref.output, 3 * 16)
    assert_same_output(scissor_compress(x.float(), tau), ref.output, 3 * 16)
    if tau >= 0:
        # Every zero token is its own component (similarity 0 is not > tau) and stays a token.
        assert (y.abs().sum(1) == 0).sum() >= 1
        assert all(ref.assignment[i] == 0 for i in (2, 16, 17, 18, 19, 20, 47))


def test_exact_ties_in_merge_go_to_smallest_index():
    # tau = 1: no edges, every token is its own representative. e0 and 2*e0 have cosine exactly
    # 1 with both T_0 = e0 and T_1 = 2*e0, so both go to j = 0; likewise e1, 3*e1 to j = 2.
    x = torch.tensor([[[1.0, 0, 0, 0], [2, 0, 0, 0], [0, 1, 0, 0], [0, 3, 0, 0]]])
    y = scissor_compress(x, tau=1.0)
    expected = torch.tensor([[4 / 3, 0, 0, 0], [2, 0, 0, 0], [0, 5 / 3, 0, 0], [0, 3, 0, 0]])
    # the method's means against the arithmetic by hand (float32): means of at most 3 tokens
    torch.testing.assert_close(y, expected, **close(torch.float32, 3, depth=2))
    assert_same_output(y, reference_scissor(x, 1.0).output, 4)


def test_bfloat16_input():
    x = clustered(4, 49, 32, 0.3, seed=7).bfloat16()
    y = scissor_compress(x, 0.9)
    y32 = scissor_compress(x.float(), 0.9)
    assert y.dtype == torch.bfloat16 and y.shape == y32.shape
    # Decisions are made in float32 on the same values: only the output is rounded.
    assert torch.equal(y, y32.bfloat16())


def test_input_is_not_modified():
    x = clustered(2, 16, 8, 0.3, seed=8)
    before = x.clone()
    scissor_compress(x, 0.8)
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------------------------
# Sampled regime


def test_sample_size():
    assert sample_size(1, 0.05) == 1
    assert sample_size(196, 0.05) == 196
    assert sample_size(3233, 0.05) == 3233
    assert sample_size(3234, 0.05) == 3233
    assert sample_size(196, 0.5) == math.ceil(math.log(196) / 0.25) < 196


def test_sampled_is_deterministic_in_the_seed():
    x = clustered(4, 196, 16, 0.3, seed=9)
    outputs = [scissor_compress(x, 0.9, 0.5, seeded(s)) for s in (0, 0, 1, 2, 3)]
    assert torch.equal(outputs[0], outputs[1])
    assert any(o.shape != outputs[0].shape or not torch.equal(o, outputs[0]) for o in outputs[2:])
    torch.manual_seed(4)
    a = scissor_compress(x, 0.9, 0.5)
    torch.manual_seed(4)
    assert torch.equal(a, scissor_compress(x, 0.9, 0.5))


def test_sampled_matches_literal_with_the_same_draws():
    x = clustered(3, 196, 16, 0.3, seed=10, dtype=torch.float64)
    ref = reference_scissor(x, 0.9, 0.5, seeded(5))
    assert_same_output(scissor_compress(x, 0.9, 0.5, seeded(5)), ref.output, 3 * 196)


@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_reference_code_style_comparator_gives_the_same_output(epsilon):
    """The benchmark's stand-in for the paper's union-find computes the same thing as ours."""
    x = clustered(3, 196, 16, 0.3, seed=14)
    y = scissor_compress(x, 0.9, epsilon, seeded(6))
    assert_same_output(reference_code_style_scissor(x, 0.9, epsilon, seeded(6)), y, 3 * 196)


@pytest.mark.parametrize("noise,tau", [(0.3, 0.9), (0.6, 0.8), (1.0, 0.3)])
def test_sampled_components_refine_exact_ones(noise, tau):
    x = clustered(1, 600, 16, noise, seed=11)[0]
    exact, n_exact = semantic_connected_components(x, tau, 0.05)
    for seed in range(3):
        approx, n_approx = semantic_connected_components(x, tau, 0.5, seeded(seed))
        assert n_approx >= n_exact
        for c in range(n_approx):
            assert exact[approx == c].unique().numel() == 1, "approximate component spans two"


# ----------------------------------------------------------------------------------------------
# Golden values and argument checks


def test_golden_values():
    golden = torch.load(GOLDEN)
    x = golden["features"].float()
    y = scissor_compress(x, golden["tau"], golden["epsilon"])
    assert y.shape == golden["expected"].shape
    # float32 here against float32 on the CPU that wrote the file (its own summation order)
    frames, n, _ = x.shape
    torch.testing.assert_close(y, golden["expected"], **close(torch.float32, frames * n, depth=2))


@pytest.mark.parametrize("tau", [1.5, -1.01, float("nan"), True, "0.9"])
def test_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match=re.escape(f"tau={tau!r}")):
        scissor_compress(torch.randn(2, 4, 8), tau)
    with pytest.raises(ValueError, match="tau"):
        semantic_connected_components(torch.randn(4, 8), tau)


@pytest.mark.parametrize("epsilon", [0, -0.1, float("inf"), float("nan")])
def test_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match=re.escape(f"epsilon={epsilon!r}")):
        scissor_compress(torch.randn(2, 4, 8), 0.9, epsilon)


@pytest.mark.parametrize("shape", [(4, 8), (0, 4, 8), (2, 0, 8), (2, 4, 0), (1, 2, 4, 8)])
def test_rejects_bad_features(shape):
    with pytest.raises(ValueError, match="features"):
        scissor_compress(torch.randn(shape), 0.9)
    with pytest.raises(TypeError, match="features"):
        scissor_compress(torch.ones(2, 4, 8, dtype=torch.long), 0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_literal():
    for seed in range(12, 30):
        x = clustered(4, 196, 64, 0.3, seed=seed)
        ref = reference_scissor(x, 0.9)
        if min(ref.margin, ref.gap) > SAFE:
            y = scissor_compress(x.cuda(), 0.9, generator=torch.Generator("cuda").manual_seed(0))
            assert y.is_cuda
            assert_same_output(y.cpu(), ref.output, 4 * 196)
            return
    pytest.fail("no input with safe margins")
