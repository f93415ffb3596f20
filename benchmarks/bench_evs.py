"""Time `evs_compress` (methods/evs.py) against its dense floor and against the literal reference.

    python benchmarks/bench_evs.py            # 32x196x3584, retention 0.1, 0.25, 0.5
    python benchmarks/bench_evs.py --quick    # retention 0.25 only, fewer repetitions

floor: the dense work no implementation can skip on the same input: every token's norm (one pass over
X) and the dot product of every token with the token at the same grid position one frame earlier
((F-1)*N*D products: X read twice), here per frame with `torch.linalg.vecdot` (the fastest form
measured: one (F-1, N, D) product allocates a temporary as large as X), plus copying the K kept rows
out. Ours adds the stable descending sort of the F*N dissimilarities.
Comparators:
  vllm     vLLM's `compute_retention_mask` restated with torch ops (F.cosine_similarity over the
           whole video, 255 for the first frame, stable argsort, mask): the official code's cost;
  literal  tests/reference/evs.py: Python loops, float64, at 32x196x256 (at D = 3584 the Python dot
           products take minutes).
CPU timings: the minimum over interleaved repetitions after a warm-up (other processes share the
machine: the load average is printed). 2 threads. OMP_WAIT_POLICY=PASSIVE unless the environment sets
it (see benchmarks/bench_divprune.py: spinning OpenMP workers take the cores of a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see above)

import torch
import torch.nn.functional as nnf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_times
from methods.evs import evs_budget, evs_compress
from tests.reference.evs import reference_evs

FRAMES, TOKENS, DIM = 32, 196, 3584


def make_input(frames: int, per_frame: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Video-like tokens: each frame the last one plus a change of random size per token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(frames, per_frame, dim)
    x[0] = torch.randn(per_frame, dim, generator=g)
    for t in range(1, frames):
        x[t] = x[t - 1] + torch.rand(per_frame, 1, generator=g) * torch.randn(per_frame, dim, generator=g)
    return x


def floor_fn(x: torch.Tensor, retention: float):
    k = evs_budget(retention, x.shape[0], x.shape[1])

    def run():
        norms = torch.linalg.vector_norm(x, dim=-1)
        dots = torch.empty(x.shape[0] - 1, x.shape[1])
        for t in range(1, x.shape[0]):
            dots[t - 1] = torch.linalg.vecdot(x[t], x[t - 1])
        return norms, dots, x.view(-1, x.shape[2])[:k].clone()

    return run


def vllm_mask(x: torch.Tensor, retention: float) -> torch.Tensor:
    """vLLM's compute_retention_mask (spatial merge 1: the (T, h, w) grid is the flat N)."""
    similarity = nnf.cosine_similarity(x[1:], x[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(x[:1, :, 0]), 1 - similarity], dim=0).view(-1)
    order = torch.argsort(dissimilarity, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:evs_budget(retention, x.shape[0], x.shape[1])]] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="retention 0.25 only, fewer repetitions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retentions = [0.25] if args.quick else [0.1, 0.25, 0.5]
    repeats = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average {os.getloadavg()[0]:.2f}")
    x = make_input(FRAMES, TOKENS, DIM)
    header = (f"{'shape':12} {'r':>5} {'K':>5} {'ours ms':>8} {'floor ms':>8} {'vllm ms':>8} "
              f"{'ours/floor':>10} {'vllm/ours':>9}  mask vs vllm")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for retention in retentions:
        t = best_times({"ours": lambda: evs_compress(x, retention), "floor": floor_fn(x, retention),
                        "vllm": lambda: vllm_mask(x, retention)}, repeats)
        keep = evs_compress(x, retention).positions
        same = torch.equal(vllm_mask(x, retention).nonzero().flatten(), keep)
        worst = max(worst, t["ours"] / t["floor"])
        print(f"{f'{FRAMES}x{TOKENS}x{DIM}':12} {retention:5.2f} {len(keep):5d} {t['ours']:8.1f} {t['floor']:8.1f} "
              f"{t['vllm']:8.1f} {t['ours'] / t['floor']:10.2f} {t['vllm'] / t['ours']:9.1f}  "
              f"{'same' if same else 'DIFFER'}", flush=True)

    small = make_input(FRAMES, TOKENS, 256, seed=1)
    ours_ms = best_times({"ours": lambda: evs_compress(small, 0.25)}, 5)["ours"]
    start = time.perf_counter()
    ref = reference_evs(small, 0.25)
    literal_ms = (time.perf_counter() - start) * 1e3
    same = evs_compress(small, 0.25).positions.tolist() == ref.keep
    print(f"\nliteral (Python loops, float64) at {FRAMES}x{TOKENS}x256, r=0.25, K={len(ref.keep)}: {literal_ms:.0f} ms "
          f"vs ours {ours_ms:.1f} ms = {literal_ms / ours_ms:.0f}x; kept {'same' if same else 'DIFFER'} "
          f"(cut gap {ref.gap:.0e})")
    print(f"worst ours/floor {worst:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
