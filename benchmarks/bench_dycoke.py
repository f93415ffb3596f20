"""Benchmark DyCoke's two stages on CPU (2 threads, float32) against their floors and the literal reference.

    python benchmarks/bench_dycoke.py [--quick]

Visual stage (temporal token merging) at 32 x 196 x 3584 (LLaVA-OV-7B, 32 frames):
  floor    the products no implementation can skip: every token's norm and the same-position dot
           products of the reduced frames with their partners (torch.linalg.vecdot on strided
           views), plus copying the kept tokens out;
  literal  tests/reference/dycoke.py (Python loops, float64): too slow for the full size, so it is
           timed at 8 x 196 x 256 and compared there with ours at the same size.
Decode stage (one step's selection over the V = 2960 video entries TTM leaves at 32 frames):
  floor    the step's attention row at layer L-1 that the selection cannot skip (7B shapes: 28 query
           heads over 4 KV heads of 128 dims, V + 100 cached entries, softmax, mean over heads)
           plus a torch.topk of its video part; ours is the same row plus select_video_entries
           (stable ties, the cosine test, the kept mask). The selection alone against topk alone
           is printed too: it is a fixed ~0.1 ms of small ops, next to a decode step of milliseconds;
  literal  ReferenceSelection.step (the selection alone).
Times are the minimum over interleaved repetitions (other processes on the machine inflate them:
the load average is printed). Target: ours <= 2x its floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.dycoke import dycoke_merge, merged_count, select_video_entries
from tests.reference.dycoke import ReferenceSelection, reference_ttm

MERGE, PRUNE, THRESHOLD = 0.7, 0.7, 0.9


def make_input(frames: int, per_frame: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Frames drifting from a shared base: same-position similarities spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(per_frame, dim, generator=g)
    drift = torch.rand(frames, per_frame, 1, generator=g)
    return base + drift * torch.randn(frames, per_frame, dim, generator=g)


def floor_fn(x: torch.Tensor):
    frames = x.shape[0]
    odd, two = frames // 2, (frames + 1) // 4
    keep = torch.arange(merged_count(frames, x.shape[1], MERGE))  # stand-in for the kept rows

    def run():
        norms = torch.linalg.vector_norm(x, dim=-1)
        dots = (torch.linalg.vecdot(x[1::2], x[0::2][:odd]), torch.linalg.vecdot(x[2::4], x[0::4][:two]))
        return norms, dots, x.flatten(0, 1)[keep]

    return run


def best_ms(fns: dict, repeats: int) -> dict:
    best = {}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 5 if args.quick else 20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, merge_ratio={MERGE}, "
          f"prune_ratio={PRUNE}, threshold={THRESHOLD}; load average {os.getloadavg()[0]:.2f}")

    # visual stage at full size: ours vs floor
    x = make_input(32, 196, 3584)
    t = best_ms({"ours": lambda: dycoke_merge(x, MERGE), "floor": floor_fn(x)}, repeats)
    m = dycoke_merge(x, MERGE).shape[0]
    print(f"visual 32x196x3584 -> {m} tokens: ours {t['ours']:.2f} ms, floor {t['floor']:.2f} ms, "
          f"ours/floor {t['ours'] / t['floor']:.2f}")

    # visual stage at a small size: ours vs the literal reference (and the floor)
    small = make_input(8, 196, 256, seed=1)
    ts = best_ms({"ours": lambda: dycoke_merge(small, MERGE), "floor": floor_fn(small)}, repeats)
    start = time.perf_counter()
    ref = reference_ttm(small, MERGE)
    literal = (time.perf_counter() - start) * 1e3
    same = torch.equal(dycoke_merge(small, MERGE).double(), ref.output)
    print(f"visual 8x196x256 -> {ref.output.shape[0]} tokens: ours {ts['ours']:.3f} ms, floor "
          f"{ts['floor']:.3f} ms, literal {literal:.0f} ms; ours/floor {ts['ours'] / ts['floor']:.2f}, "
          f"literal/ours {literal / ts['ours']:.0f}x; outputs {'same' if same else 'DIFFER'}")

    # decode stage: one step's selection over V video entries
    videos = merged_count(32, 196, MERGE)
    keep = int(videos * (1 - PRUNE))
    g = torch.Generator().manual_seed(2)
    first, later = torch.randn(videos, generator=g).softmax(0), torch.randn(videos, generator=g).softmax(0)
    selected, anchor, _ = select_video_entries(first, keep, None, None, THRESHOLD)
    td = best_ms({"ours": lambda: select_video_entries(later, keep, selected, anchor, THRESHOLD),
                  "floor": lambda: torch.topk(later, keep)}, repeats * 10)
    heads, kv_heads, head_dim, text = 28, 4, 128, 100
    q = torch.randn(1, heads, 1, head_dim, generator=g)
    keys = torch.randn(1, kv_heads, videos + text, head_dim, generator=g)

    def row():  # as methods/attention.step_attention computes it
        k = keys.repeat_interleave(heads // kv_heads, dim=1)
        return ((q @ k.transpose(2, 3)) * head_dim ** -0.5).softmax(-1, dtype=torch.float32)[0, :, 0].mean(0)

    tr = best_ms({"ours": lambda: select_video_entries(row()[:videos], keep, selected, anchor, THRESHOLD),
                  "floor": lambda: torch.topk(row()[:videos], keep)}, repeats * 5)
    reference, rows = ReferenceSelection(PRUNE, THRESHOLD), (first.tolist(), later.tolist())
    reference.step(rows[0])
    start = time.perf_counter()
    reference.step(rows[1])
    literal_d = (time.perf_counter() - start) * 1e3
    print(f"decode step, V={videos}, keep {keep}: with the attention row: ours {tr['ours']:.3f} ms, "
          f"floor {tr['floor']:.3f} ms, ours/floor {tr['ours'] / tr['floor']:.2f}; selection alone: ours "
          f"{td['ours']:.3f} ms, topk {td['floor']:.3f} ms ({td['ours'] / td['floor']:.1f}x), literal "
          f"{literal_d:.1f} ms (literal/ours {literal_d / td['ours']:.0f}x)")
    print(f"\nCPU: visual ours/floor {t['ours'] / t['floor']:.2f}, decode step ours/floor "
          f"{tr['ours'] / tr['floor']:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
