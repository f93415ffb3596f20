"""Time FlashVID's visual stage (`flashvid_visual`) against its floor and its literal reference.

    python benchmarks/bench_flashvid.py            # 32x196x3584, r = 0.10 and 0.25, two inputs
    python benchmarks/bench_flashvid.py --quick    # 16x196x896, fewer repetitions
    python benchmarks/bench_flashvid.py --threads 1

The floor is the dense work no implementation of the method can skip, sized by the plan the input
actually gets (its segments and each frame's root count): normalising the tokens, every frame's
(N x N) cosine product and (N x D) event-relevance product for ADTS, the (N x N) cosine product of
every transition inside a segment for TSTM, and the (n x n) distance product of every frame whose
n roots are clustered. Not in the
floor: the ADTS greedy (A steps over (F, N) rows), masks and maxima, the tree sums, the kNN and
nearest-denser passes, the cluster means, gathering the output. The prefill stage is FastV's
(methods/fastv.py, benchmarks of the decoder driver), not timed here. The literal reference
(tests/reference/flashvid.py: Python loops, float64, dense products as tensor ops) runs once per
input at the same size (`--quick`: at the quick size).

Inputs: "scenes" is a video of scenes of 1 to 10 frames (each frame = its scene's tokens plus
noise), so segments of several lengths, temporal merges and DPC on roots occur; "cuts" changes
scene at every frame (min_segments is reached with one-frame segments only: whole frames are
clustered). Patch scores are random. CPU timings take the minimum over interleaved repetitions,
as wall time and as process CPU time (the load average is printed: on a shared machine the wall
time includes waiting for a core); CUDA timings (when available) use CUDA events after warm-up.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_times, scene_lengths, wall_and_cpu_times
from methods.core.clustering import pairwise_distance
from methods.core.similarity import normalized
from methods.flashvid import flashvid_visual
from tests.reference.flashvid import reference_flashvid


def make_input(kind: str, frames: int, per_frame: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for length in scene_lengths(kind, frames):
        centroids = torch.randn(per_frame // 4, dim, generator=g)
        base = centroids[torch.randint(0, per_frame // 4, (per_frame,), generator=g)]
        base = base + 0.5 * torch.randn(per_frame, dim, generator=g) + 0.3
        parts.append(base + 0.2 * torch.randn(length, per_frame, dim, generator=g))
    return torch.cat(parts), torch.rand(frames, per_frame, generator=g)


def ours(x, scores, retention):
    return flashvid_visual(x, scores, retention, generator=torch.Generator("cpu").manual_seed(0))


def floor_fn(x, out):
    """The cosine and distance products of this input's plan, nothing else."""
    rest = out.budget[2]
    clustered = []  # (frame, roots) of every frame whose roots are clustered
    for s, e in out.segments:
        gamma = rest * (e - s) / max(1, sum(out.roots[s:e]))
        clustered += [(f, out.roots[f]) for f in range(s, e)
                      if gamma < 1 and math.ceil(out.roots[f] * gamma) > 0]
    multi = [(s, e) for s, e in out.segments if e - s > 1]

    means = x.mean(1)  # stand-ins for the segment means

    def run():
        unit = normalized(x)
        products = [unit @ unit.mT, x @ means[:, :, None]]
        products += [unit[s + 1:e] @ unit[s:e - 1].mT for s, e in multi]
        products += [pairwise_distance(x[f:f + 1, :n]) for f, n in clustered]  # stand-ins of the size
        return products

    return run, len(clustered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16x196x896 only, fewer repetitions")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--no-literal", action="store_true", help="skip the literal reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (16, 196, 896) if args.quick else (32, 196, 3584)
    repeats = 3 if args.quick else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, official LLaVA-OV defaults "
          f"(e=1.25, alpha=0.7, tau=0.8, seg 0.9, min 8, attn_div_v2); load average {os.getloadavg()[0]:.2f}")
    print("times in ms; ours and floor: best of interleaved runs; literal: one run, same size")
    header = (f"{'dev':4} {'input':6} {'shape':11} {'r':>5} {'segs':>4} {'dpc':>4} {'M':>5} {'ours':>8} "
              f"{'floor':>8} {'literal':>9} {'ours/floor':>10} {'cpu o/f':>7} {'lit/ours':>8}  output")
    print(header)
    print("-" * len(header))
    ratios = []
    for kind in ("scenes", "cuts"):
        x, scores = make_input(kind, *shape)
        for retention in (0.10, 0.25):
            out = ours(x, scores, retention)
            floor, clustered = floor_fn(x, out)
            run = lambda x=x, scores=scores, retention=retention: ours(x, scores, retention)
            t, c = wall_and_cpu_times({"ours": run, "floor": floor}, repeats)
            literal, check, lit_ms = "", "", math.nan
            if not args.no_literal:
                start = time.perf_counter()
                ref = reference_flashvid(x, scores, retention, noise_seed=0)
                lit_ms = (time.perf_counter() - start) * 1e3
                same = (out.positions.tolist() == ref.positions
                        and torch.allclose(out.tokens.double(), ref.tokens, rtol=1e-4, atol=1e-4))
                literal = f"{lit_ms:9.0f}"
                check = f"{'same' if same else 'DIFFER'} (margin {ref.margin:.1e})"
            ratios.append((t["ours"] / t["floor"], c["ours"] / c["floor"], lit_ms / t["ours"]))
            print(f"{'cpu':4} {kind:6} {'x'.join(map(str, shape)):11} {retention:5.2f} {len(out.segments):4d} "
                  f"{clustered:4d} {out.tokens.shape[0]:5d} {t['ours']:8.1f} {t['floor']:8.1f} {literal:>9} "
                  f"{t['ours'] / t['floor']:10.2f} {c['ours'] / c['floor']:7.2f} {lit_ms / t['ours']:8.1f}  "
                  f"{check}", flush=True)
    if torch.cuda.is_available():
        for kind in ("scenes", "cuts"):
            x, scores = (v.cuda() for v in make_input(kind, *shape))
            for retention in (0.10, 0.25):
                floor, clustered = floor_fn(x, ours(x, scores, retention))
                run = lambda x=x, scores=scores, retention=retention: ours(x, scores, retention)
                t = cuda_times({"ours": run, "floor": floor}, 10)
                print(f"{'cuda':4} {kind:6} {'x'.join(map(str, shape)):11} {retention:5.2f} {'':4} "
                      f"{clustered:4d} {'':5} {t['ours']:8.2f} {t['floor']:8.2f} {'':9} "
                      f"{t['ours'] / t['floor']:10.2f}", flush=True)
    lit = [r[2] for r in ratios if not math.isnan(r[2])]
    print(f"\nCPU: worst ours/floor {max(r[0] for r in ratios):.2f} wall, {max(r[1] for r in ratios):.2f} "
          f"CPU time (target <= 2)"
          + (f"; smallest speed-up over the literal reference {min(lit):.1f}x" if lit else "")
          + f"; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
