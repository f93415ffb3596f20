"""Time FrameFusion's own work against its floor, the literal reference, and the prefill it saves.

    python benchmarks/bench_framefusion.py            # both parts, 8 frames in part 2
    python benchmarks/bench_framefusion.py --quick    # fewer repetitions, 4 frames in part 2

1. One merging site at LLaVA-OneVision-7B width (D = 3584), 32 frames x 196 video tokens, float32
   (`merge_step`): the first site (every frame complete; half the grid positions nearly static) and a
   later one (30 % of the tokens already merged away, ragged per-position chains). Floor: the
   similarity products no implementation can skip on ragged chains: each token's norm, the
   gather of its predecessor's row and the row-wise dots. Literal: tests/reference/framefusion.py
   (Python loops, float64), one run. The pruning site's work is one attention row at one layer,
   PyramidDrop's ranking (benchmarks/bench_pdrop.py, part 1).
2. A whole prefill through the shared driver on a random Qwen2 LLM with 0.5B layer shapes and 8
   layers (benchmarks/common.py's), F frames + 100 text tokens: prefill time without a policy and with
   FrameFusion (cost 0.3), the policy's own time inside it (the driver's timer, the harness's
   compressor time, which includes the driver applying the merges) and the prefill time it saves.

CPU timings are the minimum over interleaved repetitions (the machine's load average is printed).
On a loaded machine, torch's 2 threads wait on each other at every small op (about 10 ms each):
`--threads 1` shows the work itself.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_times, llm_stage_main, part_prefill
from methods.framefusion import FrameFusion, merge_step
from tests.reference.framefusion import reference_merge_step


def site_input(frames, dim, ragged, seed=0):
    """(V, D) video states in sequence order and their grid positions: half the grid positions
    repeat across frames with noise of a scale drawn per position (cosines spread over about
    0.5-1), the other half change completely."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(196, dim, generator=g)
    scale = torch.where(torch.rand(196, generator=g) < 0.5, 0.05 + torch.rand(196, generator=g), 3.0)
    x = (base[None] + scale[None, :, None] * torch.randn(frames, 196, dim, generator=g)).flatten(0, 1)
    slots = torch.arange(196).repeat(frames)
    if ragged:
        alive = torch.rand(len(slots), generator=g) >= 0.3
        alive[:196] = True
        x, slots = x[alive], slots[alive]
    return x.contiguous(), slots


def floor_fn(x, slots):
    order = torch.sort(slots, stable=True).indices
    prev = order.clone()
    prev[order[1:]] = order[:-1]

    def run():
        norms = torch.linalg.vector_norm(x, dim=-1)
        return torch.einsum("vd,vd->v", x, x[prev]) / (norms * norms[prev])
    return run


def part_merge(repeats):
    print("1. one merging site, 32x196 tokens at D=3584, float32 (sim_floor 0.6; limit 0.7: every "
          "similar token merges, 0.3: the budget's top-k)")
    worst = 0.0
    for ragged in (False, True):
        x, slots = site_input(32, 3584, ragged)
        for limit in (0.7, 0.3):
            def ours():
                return merge_step(x, slots, 0.6, limit, 0.1)
            with torch.inference_mode():
                t = best_times({"ours": ours, "floor": floor_fn(x, slots)}, repeats)
                start = time.perf_counter()
                ref = reference_merge_step(x, slots.tolist(), 0.6, limit, 0.1)
                literal = (time.perf_counter() - start) * 1e3
                got = ours()
            same = got.keep.tolist() == ref.keep and torch.allclose(got.hidden.double(), ref.hidden, atol=1e-5)
            verdict = "same" if same else f"DIFFER (decision margin {ref.margin:.1e})"
            worst = max(worst, t["ours"] / t["floor"])
            print(f"   {'later site' if ragged else 'first site'} V={len(slots):5d} limit {limit}: merged "
                  f"{got.merged:5d}   ours {t['ours']:7.1f} ms   floor {t['floor']:7.1f} ms   literal "
                  f"{literal:8.1f} ms   ours/floor {t['ours'] / t['floor']:.2f}   literal/ours "
                  f"{literal / t['ours']:.1f}x   {verdict}", flush=True)
    return worst


def prefill(frames, repeats):
    part_prefill("framefusion", FrameFusion(cost=0.3), frames, repeats, mlp=True, frame_tokens=196)


def main() -> None:
    llm_stage_main(__doc__, part_merge, prefill, "merge site worst ours/floor")


if __name__ == "__main__":
    main()
