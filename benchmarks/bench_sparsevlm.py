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
   (bench_pdrop.py's) and 8 layers (stages after layers 1, 2, 4: the official 2, 6, 15 scaled),
   F frames + 100 text tokens: prefill time without a policy and with SparseVLM (keep 1/3), the
   policy's own time inside it (the driver's timer, what the harness reports as compressor time),
   and the prefill time it saves.

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
from methods.core.clustering import pairwise_distance
from methods.core.decoder import PrefillView
from methods.core.flops import LLMShape, retention_numbers
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
    print(f"   ours {t['ours']:8.1f} ms   floor {t['floor']:8.1f} ms   ours/floor {t['ours'] / t['floor']:.2f}")
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


def part_prefill(frames, repeats):
    model, llm = qwen2(896, 4864, 8, 14, 2)
    shape = llm.shape
    embeds, positions, span = video_prompt(frames, 896)
    video = span[1] - span[0]
    compressor = SparseVLM(keep=KEEP)
    watch = Stopwatch()
    counts = {}

    def none():
        return decoder.prefill(llm, embeds, positions, span, None, logits_to_keep=1)

    def sparsevlm():
        out = decoder.prefill(llm, embeds, positions, span, compressor.prefill_policy(shape), logits_to_keep=1,
                              timer=watch)
        counts["layers"] = out.layer_video_tokens
        return out

    with torch.inference_mode():
        t = best_times({"none": none, "sparsevlm": sparsevlm}, repeats)
        watch.total = 0.0
        sparsevlm()
        policy_ms = watch.total * 1e3
    flops = retention_numbers(video, embeds.shape[1] - video, counts["layers"], shape)["rho_flops"]
    saved = t["none"] - (t["sparsevlm"] - policy_ms)
    print(f"2. prefill, random Qwen2 with 0.5B layer shapes, 8 layers, {frames}x196 video + {TEXT} text")
    print(f"   none {t['none']:8.1f} ms   sparsevlm {t['sparsevlm']:8.1f} ms (rho_flops {flops:.3f}, layers "
          f"{counts['layers']})")
    print(f"   policy's own time {policy_ms:.1f} ms = {100 * policy_ms / t['sparsevlm']:.1f}% of its prefill; "
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
    ratio = part_stage(32, repeats)
    part_prefill(4 if args.quick else 8, repeats)
    print(f"\nstage ours/floor {ratio:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
