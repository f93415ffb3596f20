"""Time PLLaVA pooling (`methods/pllava.py`) against its floor, the spec's 3-D call and the literal reference.

    python benchmarks/bench_pllava.py            # 32x196x3584, five (retention, temporal) settings
    python benchmarks/bench_pllava.py --quick    # r = 0.25 only, fewer repetitions

Input: LLaVA-OV-7B sizes, (32, 196, 3584) float32 on the CPU. Pooling has no similarity products:
the floor is one read of X (a sum over its tokens) plus writing the M output tokens to a fresh tensor. Also timed:
the spec's literal call, `adaptive_avg_pool3d` on X viewed as (D, F, 14, 14) (it needs X transposed
to that layout), and the literal reference (tests/reference/pllava.py: one Python loop per output
cell and window element, float64), once. Target: ours <= 2x floor. CPU timings take the minimum over
interleaved repetitions (other processes on the machine inflate them: the load average is printed).
On a loaded machine every 2-thread op may also wait for its descheduled sibling thread, which
penalises many small ops far more than a few large ones; `--cpu-time` (process CPU time on one
thread) is steadier there and measures the work itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as nnf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_times
from methods.pllava import pllava_pool, pooling_shape
from tests.reference.pllava import reference_pllava

FRAMES, TOKENS, DIM = 32, 196, 3584
SETTINGS = [(0.25, 1), (0.1, 1), (0.5, 1), (0.25, 2), (0.9, 1)]


def pool3d(x: torch.Tensor, shape) -> torch.Tensor:
    volume = x.view(FRAMES, 14, 14, DIM).permute(3, 0, 1, 2).contiguous()
    return nnf.adaptive_avg_pool3d(volume, shape).permute(1, 2, 3, 0).reshape(-1, DIM)


def floor_fn(x: torch.Tensor, out_tokens: int):
    """One read of X, and a fresh (M, D) output written once (its allocation's page faults included:
    on the CPU they cost several times the write itself)."""
    def run():
        return x.sum(dim=1), x.view(-1, DIM)[:out_tokens].clone()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="r = 0.25 only, fewer repetitions")
    parser.add_argument("--cpu-time", action="store_true",
                        help="process CPU time on 1 thread instead of wall time on 2 (steadier on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.cpu_time else 2)
    clock = time.process_time if args.cpu_time else time.perf_counter
    settings = SETTINGS[:1] if args.quick else SETTINGS
    repeats = 5 if args.quick else 15
    x = torch.randn(FRAMES, TOKENS, DIM, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {'CPU' if args.cpu_time else 'wall'} time, {FRAMES}x{TOKENS}x{DIM} float32; "
          f"load average {os.getloadavg()[0]:.2f}")
    header = (f"{'r':>5} {'t':>2} {'Txhxw':>9} {'M':>5} {'ours ms':>8} {'floor ms':>8} {'pool3d ms':>9} "
              f"{'literal ms':>10} {'ours/floor':>10} {'3d/ours':>7} {'lit/ours':>8}  output")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for retention, temporal in settings:
        shape = pooling_shape(FRAMES, (14, 14), retention, temporal)
        m = shape[0] * shape[1] * shape[2]
        t = best_times({"ours": lambda r=retention, t=temporal: pllava_pool(x, (14, 14), r, t),
                        "floor": floor_fn(x, m), "pool3d": lambda s=shape: pool3d(x, s)}, repeats, clock)
        start = time.perf_counter()
        ref = reference_pllava(x, (14, 14), retention, temporal)
        literal_ms = (time.perf_counter() - start) * 1e3
        same = torch.allclose(pllava_pool(x, (14, 14), retention, temporal).double(), ref, rtol=1e-5, atol=1e-5)
        worst = max(worst, t["ours"] / t["floor"])
        print(f"{retention:5.2f} {temporal:2d} {'x'.join(map(str, shape)):>9} {m:5d} {t['ours']:8.1f} "
              f"{t['floor']:8.1f} {t['pool3d']:9.1f} {literal_ms:10.0f} {t['ours'] / t['floor']:10.2f} "
              f"{t['pool3d'] / t['ours']:7.1f} {literal_ms / t['ours']:8.0f}  {'same' if same else 'DIFFER'}",
              flush=True)
    print(f"\nworst ours/floor {worst:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
