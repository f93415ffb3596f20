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
   layers (bench_pdrop.py's), F frames + 100 text tokens: prefill time without a policy and with
   FrameFusion (cost 0.3), the policy's own time inside it (the driver's timer, the harness's
   compressor time, which includes the driver applying the merges) and the prefill time it saves.

CPU timings are the minimum over interleaved repetitions (the machine's load average is printed).
On a loaded machine, torch's 2 threads wait on each other at every small op (about 10 ms each):
`--threads 1` shows the work itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pdrop import TEXT, Stopwatch, best_times, qwen2, video_prompt
from methods.core import decoder
from methods.core.flops import retention_numbers
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


def part_prefill(frames, repeats):
    model, llm = qwen2(896, 4864, 8, 14, 2)
    shape = llm.shape
    embeds, positions, span = video_prompt(frames, 896)
    video = span[1] - span[0]
    compressor = FrameFusion(cost=0.3)
    watch = Stopwatch()
    counts = {}

    def none():
        return decoder.prefill(llm, embeds, positions, span, None, logits_to_keep=1)

    def fused():
        out = decoder.prefill(llm, embeds, positions, span, compressor.prefill_policy(shape),
                              logits_to_keep=1, timer=watch, frame_tokens=196)
        counts["layers"], counts["mlp"] = out.layer_video_tokens, out.layer_mlp_video_tokens
        return out

    with torch.inference_mode():
        t = best_times({"none": none, "framefusion": fused}, repeats)
        watch.total = 0.0
        fused()
        policy_ms = watch.total * 1e3
    flops = retention_numbers(video, embeds.shape[1] - video, counts["layers"], shape, counts["mlp"])["rho_flops"]
    saved = t["none"] - (t["framefusion"] - policy_ms)
    print(f"2. prefill, random Qwen2 with 0.5B layer shapes, 8 layers, {frames}x196 video + {TEXT} text")
    print(f"   none {t['none']:8.1f} ms   framefusion {t['framefusion']:8.1f} ms (rho_flops {flops:.3f}, "
          f"attention {counts['layers']}, MLP {counts['mlp']})")
    print(f"   policy's own time {policy_ms:.1f} ms = {100 * policy_ms / t['framefusion']:.1f}% of its "
          f"prefill; LLM time saved {saved:.1f} ms; policy/saved {policy_ms / saved:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 4 frames in part 2")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load average "
          f"{os.getloadavg()[0]:.2f}; times: best of {repeats} interleaved runs")
    worst = part_merge(repeats)
    part_prefill(4 if args.quick else 8, repeats)
    print(f"\nmerge site worst ours/floor {worst:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
