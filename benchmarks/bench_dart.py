"""Time DART's own work against its floor, the literal reference, and the prefill it saves.

    python benchmarks/bench_dart.py            # both parts, 8 frames in part 2
    python benchmarks/bench_dart.py --quick    # fewer repetitions, 4 frames in part 2

1. The selection before layer 2 at LLaVA-OneVision-7B shapes (d = 3584, 28 heads, 4 KV heads of
   128), 32 frames (n = 32*196 video + 100 text entries), float32, keep 0.222: the policy's `act` on
   a PrefillView (layer 1's keys with their rotary embedding and L1 norms, the final norm of the
   sequence, 8 pivots' cosines, 8 sequential picks) vs its floor, the products no implementation
   can skip: layer 1's input norm and key projection of all n entries with their rotary
   embedding, the final norm of all n entries and the 8 pivots' cosines with every video token.
   The literal reference (tests/reference/dart.py: Python sets and loops, float64) is run once on
   the same inputs and checked to keep the same set.
2. A whole prefill through the shared driver on a random Qwen2 LLM with 0.5B layer shapes
   (benchmarks/common.py's) and 8 layers, F frames + 100 text tokens: prefill time without a policy and
   with DART (keep 0.222), the policy's own time inside it (the driver's timer, what the harness
   reports as compressor time), and the prefill time it saves.

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
from methods.core.decoder import PrefillView
from methods.core.flops import LLMShape
from methods.core.similarity import normalized
from methods.dart import DART
from tests.reference.dart import reference_select

KEEP = 0.222


def selection_view(frames, seed=0):
    """A PrefillView before layer 2 of a 7B-shaped stack (only layer 1 and the final norm are real)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2RMSNorm,
        Qwen2RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=3584, intermediate_size=8, num_attention_heads=28,
                         num_key_value_heads=4, num_hidden_layers=28, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(config, layer_idx=1).eval()  # the MLP is not used: kept tiny
    norm = Qwen2RMSNorm(3584)
    embeds, positions, (start, end) = video_prompt(frames, 3584, seed)
    rotary = Qwen2RotaryEmbedding(config)(embeds, positions)
    n = embeds.shape[1]
    view = PrefillView(2, embeds, positions, torch.arange(n), torch.arange(start, end), start, torch.arange(end, n),
                       _inputs={1: (layer, embeds, rotary)}, _apply_rotary=apply_rotary_pos_emb, _norm=norm)
    return view, layer, norm, rotary, apply_rotary_pos_emb


def part_selection(frames, repeats):
    view, layer, norm, (cos, sin), rope = selection_view(frames)
    policy_of = lambda: DART(keep=KEEP).prefill_policy(LLMShape(3584, 18944, 28))  # noqa: E731
    video = view.video

    def ours():
        return policy_of().act(view)

    def floor():
        x = layer.input_layernorm(view.hidden)
        attn = layer.self_attn
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        keys = rope(k, k, cos, sin)[1]
        unit = normalized(norm(view.hidden)[0])
        return keys.abs().sum(-1), unit[video[:8]] @ unit[video].T

    with torch.inference_mode():
        kept = ours().video
        start = time.perf_counter()
        ref = reference_select(view.keys(), view.final_norm()[0], range(int(video[0]), int(video[-1]) + 1),
                               view.query.tolist(), 4, 4, KEEP)
        literal = (time.perf_counter() - start) * 1e3
        assert (video[kept]).tolist() == ref.kept
        t = best_times({"ours": ours, "floor": floor}, repeats)
    print(f"1. selection before layer 2, 7B shapes, {frames}x196 video + {TEXT} text, float32: keeps {len(kept)}")
    print(ours_vs_floor(t) + f"   (literal reference: {literal:.0f} ms, same kept set)")
    return t["ours"] / t["floor"]


def prefill(frames, repeats):
    part_prefill("dart", DART(keep=KEEP), frames, repeats)


def main() -> None:
    llm_stage_main(__doc__, lambda repeats: part_selection(32, repeats), prefill, "selection ours/floor")


if __name__ == "__main__":
    main()
