"""Time `divprune_compress` against its dense floor and against literal / official-style greedy loops.

    python benchmarks/bench_divprune.py            # 32x196x3584, retention 0.25 and 0.1, both scopes
    python benchmarks/bench_divprune.py --quick    # fewer repetitions, no slow comparators

floor: the dense work no exact implementation can skip, on the same input: row-normalising X and
the cosine products of every token with every other (scope video: one (F*N, F*N) matrix; scope
frame: the (F, N, N) batch). The first pick needs every token's nearest-neighbour distance, so
all n^2 products are needed whatever the greedy loop does afterwards.
Comparators (the same algorithm; their picks are compared with ours: a difference can only start
at a near tie, where float32 products from different kernels round apart; the float64 gap there
is printed):
  official  tests/divprune_reference.official_style_select: the official function's structure
            with tensor ops, re-minimum over all selected rows at every step (O(k^2 n)), unmasked;
  stream    no (n, n) matrix: the first pick from row blocks of the product, then each step one
            (n, D) x (D,) product with the newly picked token (O(k n D)); less memory, more work;
  literal   tests/divprune_reference.reference_select: plain Python loops, float64, at a smaller
            size (2x196x256): at 32x196x3584 it would run k^2 n / 2 ~ 8e9 Python steps.
CPU timings: the minimum over interleaved repetitions after a warm-up (other processes share the
machine: the load average is printed). 2 threads unless --threads says otherwise.
OMP_WAIT_POLICY=PASSIVE unless the environment sets it: on a shared, oversubscribed machine the
OpenMP workers' spin-waiting after each parallel region takes the core the main thread needs, and
code made of many small ops pays for it at every op (vidcom2 on an 8x196x64 input, 2 threads,
load ~7 on 2 cores: 152 ms active vs 0.7 ms passive; 0.5 ms with 1 thread).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see above)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_times, once
from methods.divprune import divprune_budget, divprune_compress, divprune_select
from tests.reference.divprune import official_style_select, reference_select


def make_input(frames: int, per_frame: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Video-like tokens: a few hundred shared objects plus noise, each frame a drift of the last."""
    g = torch.Generator().manual_seed(seed)
    objects = torch.randn(256, dim, generator=g)
    pick = torch.randint(0, 256, (frames, per_frame), generator=g)
    return objects[pick] + 0.5 * torch.randn(frames, per_frame, dim, generator=g)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norms > 0, norms, 1.0)


def floor_fn(x: torch.Tensor, scope: str):
    def run():
        if scope == "video":
            u = unit_rows(x.reshape(-1, x.shape[-1]))
            return u @ u.T
        u = unit_rows(x)
        return torch.bmm(u, u.mT)
    return run


def stream_select(x: torch.Tensor, k: int, block: int = 512) -> torch.Tensor:
    """(n, D) -> (k,) the same greedy picks without the (n, n) matrix."""
    u = unit_rows(x.float())
    n = u.shape[0]
    nearest_other = torch.empty(n)
    col_min = torch.full((n,), float("inf"))
    for i in range(0, n, block):  # row and column minima of 1 - cos, diagonal excluded
        d = (u[i:i + block] @ u.T).neg_().add_(1.0)
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = float("inf")
        nearest_other[i:i + block] = d.amin(dim=1)
        torch.minimum(col_min, d.amin(dim=0), out=col_min)
    first = torch.minimum(nearest_other, col_min).argmax()
    nearest = (u @ u[first]).neg_().add_(1.0)
    nearest[first] = float("-inf")
    picks = [first]
    for _ in range(k - 1):
        pick = nearest.argmax()
        picks.append(pick)
        torch.minimum(nearest, (u @ u[pick]).neg_().add_(1.0), out=nearest)
        nearest[pick] = float("-inf")
    return torch.stack(picks)


def divergence(ours: torch.Tensor, other: torch.Tensor, flat: torch.Tensor) -> str:
    """'same', or the first step where the picks differ and how far apart the two picked tokens'
    scores are in float64 there (a near tie: float32 products of different kernels round apart)."""
    differ = (ours != other).nonzero()
    if len(differ) == 0:
        return "same"
    step = int(differ[0])
    u = unit_rows(flat.double())
    if step == 0:
        dist = 1 - u @ u.T
        dist.fill_diagonal_(float("inf"))
        score = torch.minimum(dist.amin(0), dist.amin(1))
    else:
        score = (1 - u[ours[:step]] @ u.T).amin(0)
    gap = abs(float(score[ours[step]] - score[other[step]]))
    return f"step {step} (gap {gap:.0e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no slow comparators")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average {os.getloadavg()[0]:.2f}")
    print("times in ms; ours and floor: best of interleaved runs; official and stream: one run")
    header = (f"{'shape':12} {'scope':5} {'r':>5} {'k':>5} {'ours':>8} {'floor':>8} {'official':>9} "
              f"{'stream':>8} {'ours/floor':>10} {'off/ours':>8} {'str/ours':>8}  picks vs official; vs stream")
    print(header)
    print("-" * len(header))
    frames, per_frame, dim = 32, 196, 3584
    x = make_input(frames, per_frame, dim)
    flat = x.reshape(-1, dim)
    ratios = []
    for scope in ("video", "frame"):
        floor = floor_fn(x, scope)
        for retention in (0.25, 0.1):
            n = frames * per_frame if scope == "video" else per_frame
            k = divprune_budget(retention, n)
            t = best_times({"ours": lambda: divprune_compress(x, retention, scope), "floor": floor}, repeats)
            ratios.append(t["ours"] / t["floor"])
            official = stream = None
            same = "-"
            if scope == "video" and not args.quick:
                ours_picks = divprune_select(flat[None], k)[0]
                official, off_picks = once(lambda: official_style_select(flat, k))
                stream, str_picks = once(lambda: stream_select(flat, k))
                same = f"{divergence(ours_picks, off_picks, flat)}; {divergence(ours_picks, str_picks, flat)}"
            print(f"{f'{frames}x{per_frame}x{dim}':12} {scope:5} {retention:5.2f} {k:5d} {t['ours']:8.0f} "
                  f"{t['floor']:8.0f} {official or float('nan'):9.0f} {stream or float('nan'):8.0f} "
                  f"{t['ours'] / t['floor']:10.2f} {(official or float('nan')) / t['ours']:8.1f} "
                  f"{(stream or float('nan')) / t['ours']:8.1f}  {same}", flush=True)

    # the literal Python reference, at a size where it finishes
    small = make_input(2, 196, 256, seed=1)
    n = small.shape[0] * small.shape[1]
    k = divprune_budget(0.25, n)
    ours_ms = best_times({"ours": lambda: divprune_compress(small, 0.25)}, 5)["ours"]
    literal_ms, ref = once(lambda: reference_select(small.reshape(n, -1), k, dtype=torch.float32))
    same = torch.equal(divprune_select(small.reshape(1, n, -1), k)[0], torch.tensor(ref.picks))
    print(f"\nliteral (Python loops) at 2x196x256, r=0.25, k={k}: {literal_ms:.0f} ms vs ours "
          f"{ours_ms:.1f} ms = {literal_ms / ours_ms:.0f}x; picks {'same' if same else 'DIFFER'}")
    print(f"worst ours/floor {max(ratios):.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
