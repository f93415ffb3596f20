"""Time `vidcom2_compress` against its floor and against official-style and literal implementations.

    python benchmarks/bench_vidcom2.py            # 32x196x3584, retention 0.25 and 0.1
    python benchmarks/bench_vidcom2.py --quick    # fewer repetitions, no literal run

VidCom2 has no similarity matrix: it is memory-bound. floor: the passes over X no implementation
can skip, as the fastest torch reductions/products: one reduction over all of X (the channel
statistics need every entry), the token-centre products (every token against the video and its
frame centre: one (F, N, D) x (F, D, 2) product) and writing the M kept rows. Ours makes three
passes over X (the centres need the norms, which need the channel set, which needs the variance),
so about 1.5x the floor is the best a torch implementation can do.
Comparators (same output as ours on this input, checked):
  official  tests/vidcom2_reference.official_style_vidcom2: the official file's computation with
            tensor ops (torch.var, gathered channels, explicit differences to the centres, a
            per-frame top-k loop);
  literal   tests/vidcom2_reference.reference_vidcom2: plain Python in double precision, at a
            smaller size (4x196x64): at 32x196x3584 it would loop over 22M entries several times.
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
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see above)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_times
from methods.vidcom2 import vidcom2_compress, vidcom2_keep
from tests.reference.vidcom2 import official_style_vidcom2, reference_vidcom2


def make_input(frames: int, per_frame: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Frames with their own mean and spread, channels of varied scale (budgets differ by frame)."""
    g = torch.Generator().manual_seed(seed)
    channel_scale = 0.2 + 2 * torch.rand(dim, generator=g)
    frame_mean = torch.randn(dim, generator=g) + 0.6 * torch.randn(frames, 1, dim, generator=g)
    spread = 0.3 + torch.rand(frames, 1, 1, generator=g)
    return (frame_mean + spread * torch.randn(frames, per_frame, dim, generator=g)) * channel_scale


def floor_fn(x: torch.Tensor, kept: torch.Tensor):
    frames, per_frame, dim = x.shape
    flat = x.reshape(frames * per_frame, dim)
    centres = torch.randn(frames, 2, dim, generator=torch.Generator().manual_seed(1))

    def run():
        return flat.sum(0), torch.bmm(x, centres.mT), flat.index_select(0, kept)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no literal run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average {os.getloadavg()[0]:.2f}")
    print("times in ms, best of interleaved runs")
    header = (f"{'shape':12} {'r':>5} {'M':>5} {'rho_tok':>7} {'ours':>8} {'floor':>8} {'official':>9} "
              f"{'ours/floor':>10} {'off/ours':>8}  output")
    print(header)
    print("-" * len(header))
    frames, per_frame, dim = 32, 196, 3584
    x = make_input(frames, per_frame, dim)
    ratios = []
    for retention in (0.25, 0.1):
        y = vidcom2_compress(x, retention)
        same = torch.equal(y, official_style_vidcom2(x, retention))
        kept = vidcom2_keep(x, retention).flatten().nonzero().squeeze(1)
        t = best_times({"ours": lambda: vidcom2_compress(x, retention), "floor": floor_fn(x, kept),
                        "official": lambda: official_style_vidcom2(x, retention)}, repeats)
        ratios.append(t["ours"] / t["floor"])
        print(f"{f'{frames}x{per_frame}x{dim}':12} {retention:5.2f} {y.shape[0]:5d} "
              f"{y.shape[0] / (frames * per_frame):7.3f} {t['ours']:8.1f} {t['floor']:8.1f} "
              f"{t['official']:9.1f} {t['ours'] / t['floor']:10.2f} {t['official'] / t['ours']:8.2f}  "
              f"{'same' if same else 'DIFFER'}", flush=True)
    if not args.quick:
        small = make_input(4, 196, 64, seed=1)
        ours_ms = best_times({"ours": lambda: vidcom2_compress(small, 0.25)}, 10)["ours"]
        start = time.perf_counter()
        ref = reference_vidcom2(small, 0.25)
        literal_ms = (time.perf_counter() - start) * 1e3
        same = torch.equal(vidcom2_compress(small, 0.25), ref.output)
        print(f"\nliteral (Python, double) at 4x196x64, r=0.25: {literal_ms:.0f} ms vs ours "
              f"{ours_ms:.2f} ms = {literal_ms / ours_ms:.0f}x; output {'same' if same else 'DIFFER'}")
    print(f"worst ours/floor {max(ratios):.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
