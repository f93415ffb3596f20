"""Time STTM's own work against its floor, the literal reference, and the prefill it saves.

    python benchmarks/bench_sttm.py            # both parts, 8 frames in part 2
    python benchmarks/bench_sttm.py --quick    # fewer repetitions, 4 frames in part 2

1. The merge at LLaVA-OneVision-7B width (D = 3584), 32 frames x 14x14 video states, float32
   (`sttm_merge`, the default (tau_s, tau_t) = (0.85, 0.65)) on bench_pdrop.py's prompt (half of
   the grid positions nearly still across frames). Floor: the passes over the states no
   implementation can skip: one 2x2 pooling of every token, every token's cosine with its parent,
   every token's cosine with the same position in the next frame, one scatter of every token into
   its survivor. Literal: tests/reference/sttm.py (Python loops, float64) on the first 8 frames,
   one run, checked to give the same survivors.
2. A whole prefill through the shared driver on a random Qwen2 LLM with 0.5B layer shapes and 8
   layers (bench_pdrop.py's), F frames + 100 text tokens: prefill time without a policy and with
   STTM (layer 2, compacted positions), the policy's own time inside it (the driver's timer, the
   harness's compressor time) and the prefill time it saves.

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
from methods.core.similarity import cosine, normalized
from methods.sttm import STTM, sttm_merge
from tests.reference.sttm import reference_sttm

TAU_S, TAU_T = STTM().tau_s, STTM().tau_t


def part_merge(frames, repeats):
    embeds, _, (start, end) = video_prompt(frames, 3584)
    states = embeds[0, start:end] * 50  # unit-scale states
    grid = states.view(frames, 14, 14, -1)

    def ours():
        return sttm_merge(states, frames, (14, 14), TAU_S, TAU_T)

    index = ours()[0]

    def floor():
        x = grid.float()
        parents = x.view(frames, 7, 2, 7, 2, -1).mean((2, 4))
        spatial = cosine(x, parents.repeat_interleave(2, 1).repeat_interleave(2, 2))
        unit = normalized(x.flatten(0, 2))
        temporal = (unit[196:] * unit[:-196]).sum(-1)
        owner = torch.searchsorted(index, torch.arange(len(unit)), right=True) - 1  # any survivor map
        merged = torch.zeros(len(index), unit.shape[1]).index_add_(0, owner, x.flatten(0, 2))
        return spatial, temporal, merged

    start_ref = time.perf_counter()
    ref = reference_sttm(grid[:8], TAU_S, TAU_T)
    literal = (time.perf_counter() - start_ref) * 1e3
    assert sttm_merge(states[:8 * 196], 8, (14, 14), TAU_S, TAU_T)[0].tolist() == ref.keys
    with torch.inference_mode():
        t = best_times({"ours": ours, "floor": floor}, repeats)
    print(f"1. merge, 7B width, {frames}x196 video states, float32: {len(index)} survivors "
          f"({100 * len(index) / (frames * 196):.1f} %)")
    print(f"   ours {t['ours']:8.1f} ms   floor {t['floor']:8.1f} ms   ours/floor {t['ours'] / t['floor']:.2f}"
          f"   (literal reference on 8 frames: {literal:.0f} ms, same survivors)")
    return t["ours"] / t["floor"]


def part_prefill(frames, repeats):
    model, llm = qwen2(896, 4864, 8, 14, 2)
    shape = llm.shape
    embeds, positions, span = video_prompt(frames, 896)
    video = span[1] - span[0]
    compressor = STTM()
    watch = Stopwatch()
    counts = {}

    def none():
        return decoder.prefill(llm, embeds, positions, span, None, logits_to_keep=1)

    def sttm():
        out = decoder.prefill(llm, embeds, positions, span, compressor.prefill_policy(shape), logits_to_keep=1,
                              timer=watch, frame_tokens=196)
        counts["layers"] = out.layer_video_tokens
        return out

    with torch.inference_mode():
        t = best_times({"none": none, "sttm": sttm}, repeats)
        watch.total = 0.0
        sttm()
        policy_ms = watch.total * 1e3
    flops = retention_numbers(video, embeds.shape[1] - video, counts["layers"], shape)["rho_flops"]
    saved = t["none"] - (t["sttm"] - policy_ms)
    print(f"2. prefill, random Qwen2 with 0.5B layer shapes, 8 layers, {frames}x196 video + {TEXT} text")
    print(f"   none {t['none']:8.1f} ms   sttm {t['sttm']:8.1f} ms (rho_flops {flops:.3f}, layers {counts['layers']})")
    print(f"   policy's own time {policy_ms:.1f} ms = {100 * policy_ms / t['sttm']:.1f}% of its prefill; "
          f"LLM time saved {saved:.1f} ms; policy/saved {policy_ms / saved:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 4 frames in part 2")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load average "
          f"{os.getloadavg()[0]:.2f}; times: best of {repeats} interleaved runs")
    ratio = part_merge(32, repeats)
    part_prefill(4 if args.quick else 8, repeats)
    print(f"\nmerge ours/floor {ratio:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
