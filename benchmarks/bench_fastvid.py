"""Time `fastvid_compress` against its floor and against the literal reference.

    python benchmarks/bench_fastvid.py            # 32x196x3584, r = 0.10 and 0.25, two inputs
    python benchmarks/bench_fastvid.py --quick    # 16x196x896 only, fewer repetitions
    python benchmarks/bench_fastvid.py --threads 1

The floor is the dense work no implementation of the method can skip, sized by the plan the
input actually gets (same segments, anchor frames and anchor counts): the per-anchor-frame
(M x M) distance products of the density-peak scores, batched, and each merge unit's
(members x anchors) cosine product (and normalising the tokens). Not in the floor: gathering
the non-salient tokens, the kNN and nearest-denser passes over the distances, the merge sums.
The literal reference (tests/reference/fastvid.py: Python loops, float64, with the dense
products as tensor ops) runs once per input at the same size.

Inputs: "scenes" is a video of a few scenes of different lengths (frames of a scene = its tokens
plus noise), so segments of 1 to 10 frames and multi-frame merges occur; "cuts" changes scene at
every frame, so every frame is its own segment (the single-frame path only). Saliency is random,
the global feature is the frame's mean token (the fallback head). CPU timings take the minimum
over interleaved repetitions with 2 threads, as wall time and as process CPU time (the load
average is printed: on a shared machine waiting for a core inflates the wall time, most of all
for the memory-bound gathers the floor leaves out); CUDA timings (when available) use CUDA
events after warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_times, scene_lengths, wall_and_cpu_times
from methods.core.similarity import normalized
from methods.fastvid import anchor_plan, budgets, fastvid_compress, segment_bounds
from tests.reference.fastvid import reference_fastvid


def make_input(kind: str, frames: int, per_frame: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for length in scene_lengths(kind, frames):
        centroids = torch.randn(per_frame // 4, dim, generator=g)
        base = centroids[torch.randint(0, per_frame // 4, (per_frame,), generator=g)]
        base = base + 0.5 * torch.randn(per_frame, dim, generator=g)
        parts.append(base + 0.2 * torch.randn(length, per_frame, dim, generator=g))
    x = torch.cat(parts)
    saliency = torch.rand(frames, per_frame, generator=g)
    return x, saliency, x.mean(1)


def ours(x, saliency, glob, retention):
    return fastvid_compress(x, saliency, glob, retention,
                            generator=torch.Generator("cpu").manual_seed(0))


def floor_fn(x, saliency, glob, retention):
    """The distance and similarity products of this input's plan, nothing else."""
    frames, per_frame, dim = x.shape
    _, n_c, n_s = budgets(per_frame, retention, 0.4)
    rest = per_frame - n_s
    units = anchor_plan(segment_bounds(glob, 8, 0.9), n_c, 4, rest)
    anchor_frames = sorted({f for u in units for f in u.anchor_frames})
    tokens = x[:, :rest]  # stand-ins of the right sizes
    shapes = [(u.start, u.length, len(u.anchor_frames) * u.anchors) for u in units]

    def run():
        chosen = tokens[anchor_frames]
        dist = torch.bmm(chosen, chosen.mT)
        units_ = normalized(tokens)
        flat = units_.reshape(-1, dim)
        sims = [flat[s * rest:(s + length) * rest] @ flat[:k].T for s, length, k in shapes]
        return dist, sims

    return run, len(anchor_frames), len(units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16x196x896 only, fewer repetitions")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (16, 196, 896) if args.quick else (32, 196, 3584)
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, defaults c=8 tau=0.9 "
          f"d=0.4 p=4 alpha=0.6; load average {os.getloadavg()[0]:.2f}")
    print("times in ms; ours and floor: best of interleaved runs; literal: one run, same size")
    header = (f"{'dev':4} {'input':6} {'shape':11} {'r':>5} {'segs':>4} {'anch':>4} {'M':>5} "
              f"{'ours':>8} {'floor':>8} {'literal':>9} {'ours/floor':>10} {'cpu o/f':>7} "
              f"{'lit/ours':>8}  output")
    print(header)
    print("-" * len(header))
    ratios = []
    for kind in ("scenes", "cuts"):
        x, saliency, glob = make_input(kind, *shape)
        for retention in (0.10, 0.25):
            out = ours(x, saliency, glob, retention)
            floor, anchors, units = floor_fn(x, saliency, glob, retention)
            segs = len(segment_bounds(glob, 8, 0.9))
            t, c = wall_and_cpu_times({"ours": lambda: ours(x, saliency, glob, retention), "floor": floor},
                                      repeats)
            start = time.perf_counter()
            ref = reference_fastvid(x, saliency, glob, retention, noise_seed=0)
            lit_ms = (time.perf_counter() - start) * 1e3
            same = (out.positions.tolist() == ref.positions
                    and torch.allclose(out.tokens.double(), ref.tokens, rtol=1e-4, atol=1e-4))
            ratios.append((t["ours"] / t["floor"], c["ours"] / c["floor"], lit_ms / t["ours"]))
            print(f"{'cpu':4} {kind:6} {'x'.join(map(str, shape)):11} {retention:5.2f} {segs:4d} "
                  f"{anchors:4d} {out.tokens.shape[0]:5d} {t['ours']:8.1f} {t['floor']:8.1f} "
                  f"{lit_ms:9.0f} {t['ours'] / t['floor']:10.2f} {c['ours'] / c['floor']:7.2f} "
                  f"{lit_ms / t['ours']:8.1f}  {'same' if same else 'DIFFER'} "
                  f"(margin {ref.margin:.1e})", flush=True)
    if torch.cuda.is_available():
        for kind in ("scenes", "cuts"):
            x, saliency, glob = (t.cuda() for t in make_input(kind, *shape))
            for retention in (0.10, 0.25):
                floor, anchors, _ = floor_fn(x, saliency, glob, retention)
                t = cuda_times({"ours": lambda: ours(x, saliency, glob, retention), "floor": floor}, 10)
                print(f"{'cuda':4} {kind:6} {'x'.join(map(str, shape)):11} {retention:5.2f} "
                      f"{'':4} {anchors:4d} {'':5} {t['ours']:8.2f} {t['floor']:8.2f} {'':9} "
                      f"{t['ours'] / t['floor']:10.2f}", flush=True)
    print(f"\nCPU: worst ours/floor {max(r[0] for r in ratios):.2f} wall, {max(r[1] for r in ratios):.2f} "
          f"CPU time (target <= 2); smallest speed-up over the literal reference "
          f"{min(r[2] for r in ratios):.1f}x; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
