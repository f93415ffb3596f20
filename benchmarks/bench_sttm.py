"""Time STTM's own work against its floor, the literal reference, and the prefill it saves.

    python benchmarks/bench_sttm.py            # both parts, 8 frames in part 2
    python benchmarks/bench_sttm.py --quick    # fewer repetitions, 4 frames in part 2

1. The merge at LLaVA-OneVision-7B width (D = 3584), 32 frames x 14x14 video states, float32
   (`sttm_merge`, the default (tau_s, tau_t) = (0.85, 0.65)) on benchmarks/common.py's prompt (half of
   the grid positions nearly still across frames). Floor: the passes over the states no
   implementation can skip: one 2x2 pooling of every token, every token's cosine with its parent,
   every token's cosine with the same position in the next frame, one scatter of every token into
   its survivor. Literal: tests/reference/sttm.py (Python loops, float64) on the first 8 frames,
   one run, checked to give the same survivors.
2. A whole prefill through the shared driver on a random Qwen2 LLM with 0.5B layer shapes and 8
   layers (benchmarks/common.py's), F frames + 100 text tokens: prefill time without a policy and with
   STTM (layer 2, compacted positions), the policy's own time inside it (the driver's timer, the
   harness's compressor time) and the prefill time it saves.

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

from benchmarks.common import (
    best_times,
    llm_stage_main,
    ours_vs_floor,
    part_prefill,
    video_prompt,
)
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
    print(ours_vs_floor(t) + f"   (literal reference on 8 frames: {literal:.0f} ms, same survivors)")
    return t["ours"] / t["floor"]


def prefill(frames, repeats):
    part_prefill("sttm", STTM(), frames, repeats, frame_tokens=196)


def main() -> None:
    llm_stage_main(__doc__, lambda repeats: part_merge(32, repeats), prefill, "merge ours/floor")


if __name__ == "__main__":
    main()
