"""Time SparseVLM's own work against its floor, the literal reference, and the prefill it saves.

    python benchmarks/bench_sparsevlm.py            # both parts, 8 frames in part 2
    python benchmarks/bench_sparsevlm.py --quick    # fewer repetitions, 4 frames in part 2

1. The first stage at LLaVA-OneVision-7B shapes (d = 3584, 28 heads, 4 KV heads of 128), 32 frames
   (n = 32*196 video + 100 text entries), float32, keep 1/3 (3092 kept of 6272, 955 recycled into 96
   clusters): the policy's `act` before layer 3 (the raters' attention rows at layer 2, the top-k,
   the recycling's DPC-kNN) vs its floor, the products no implementation can skip: layer 2's input
   norm and key projection of all n entries with their rotary embedding, the raters' queries,
   their softmax rows over the n entries, and the distance matrix of the recycled tokens. The
   raters (once per prefill, before layer 0: video x text dot products) are timed apart. The
   literal reference (tests/reference/sparsevlm.py, Python loops, float64) is too slow at this
   size: it is checked on the same stage at 4 frames of width 64, one run.
2. A whole prefill through the shared driver on a random Qwen2 LLM with 0.5B layer shapes
   (benchmarks/common.py's) and 8 layers (stages after layers 1, 2, 4: the official 2, 6, 15 scaled),
   F frames + 100 text tokens: prefill time without a policy and with SparseVLM (keep 1/3), the
   policy's own time inside it (the driver's timer, what the harness reports as compressor time),
   and the prefill time it saves.

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
    TEXT,
    best_times,
    llm_stage_main,
    ours_vs_floor,
    part_prefill,
    video_prompt,
)
from methods.core.clustering import pairwise_distance
from methods.core.decoder import PrefillView
from methods.core.flops import LLMShape
from methods.sparsevlm import SparseVLM, stage, stage_counts
from tests.reference.sparsevlm import reference_stage

KEEP = 1 / 3


def stage_views(frames, dim, heads, kv_heads, seed=0):
    """(view before layer 0, view before layer 3) of a stack whose layer 2 is real."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=dim, intermediate_size=8, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=28, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(config, layer_idx=2).eval()
    embeds, positions, (start, end) = video_prompt(frames, dim, seed)
    rotary = Qwen2RotaryEmbedding(config)(embeds, positions)
    n = embeds.shape[1]
    parts = dict(positions=positions, origin=torch.arange(n), video=torch.arange(start, end), video_start=start,
                 query=torch.arange(end, n), _apply_rotary=apply_rotary_pos_emb)
    before = PrefillView(layer=0, hidden=embeds, **parts)
    stage_view = PrefillView(layer=3, hidden=embeds, _inputs={2: (layer, embeds, rotary)}, **parts)
    return before, stage_view, layer, rotary, apply_rotary_pos_emb


def part_stage(frames, repeats):
    shape = LLMShape(3584, 18944, 28)
    before, view, layer, (cos, sin), rope = stage_views(frames, 3584, 28, 4)
    policy = SparseVLM(keep=KEEP).prefill_policy(shape)
    with torch.inference_mode():
        start = time.perf_counter()
        policy.act(before)
        raters_ms = (time.perf_counter() - start) * 1e3
    video = len(view.video)
    k = policy._schedule[0]
    kept, clusters = stage_counts(video, [k])[0]
    recycled = int((video - kept) * 0.3) + 1
    raters = view.query[policy._raters]

    def ours():
        policy._stage, policy._generator = 0, torch.Generator().manual_seed(0)
        return policy.act(view)

    def floor():
        x = layer.input_layernorm(view.hidden)
        attn = layer.self_attn
        k_ = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        q = attn.q_proj(x[:, raters]).view(1, len(raters), -1, attn.head_dim).transpose(1, 2)
        q, k_ = rope(q, q, cos[:, raters], sin[:, raters])[0], rope(k_, k_, cos, sin)[1]
        k_ = k_.repeat_interleave(attn.num_key_value_groups, dim=1)
        rows = ((q @ k_.transpose(2, 3)) * attn.scaling).softmax(-1).mean(1)
        return rows, pairwise_distance(view.hidden[:, view.video[:recycled]])

    with torch.inference_mode():
        out = ours()
        assert len(out.video) == kept + clusters
        t = best_times({"ours": ours, "floor": floor}, repeats)
    print(f"1. first stage, 7B shapes, {frames}x196 video + {TEXT} text, float32: keeps {kept}, recycles "
          f"{recycled} into {clusters} clusters ({len(raters)} raters, chosen in {raters_ms:.0f} ms before layer 0)")
    print(ours_vs_floor(t))
    # the literal reference on the same stage, smaller
    _, small, _, _, _ = stage_views(4, 64, 4, 2)
    scores = small.attention(small.query[:8])[:, small.video].mean(0)
    states = small.hidden[0, small.video]
    count = len(scores)
    kept_small = stage_counts(count, [count // 3])[0][0]
    noise = torch.rand((1, int((count - kept_small) * 0.3) + 1), generator=torch.Generator().manual_seed(0))[0] * 1e-6
    start = time.perf_counter()
    ref = reference_stage(scores.tolist(), states, count // 3, noise)
    literal = (time.perf_counter() - start) * 1e3
    entries, _, order = stage(scores, states, count // 3, generator=torch.Generator().manual_seed(0))
    assert entries[order].tolist() == ref.entries
    print(f"   (literal reference on the stage at 4x196 tokens of width 64: {literal:.0f} ms, same tokens)")
    return t["ours"] / t["floor"]


def prefill(frames, repeats):
    part_prefill("sparsevlm", SparseVLM(keep=KEEP), frames, repeats)


def main() -> None:
    llm_stage_main(__doc__, lambda repeats: part_stage(32, repeats), prefill, "stage ours/floor")


if __name__ == "__main__":
    main()
