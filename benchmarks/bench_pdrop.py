"""Time PyramidDrop's own work against its floor and against the prefill time it saves.

    python benchmarks/bench_pdrop.py            # both parts, 8 frames in part 2
    python benchmarks/bench_pdrop.py --quick    # fewer repetitions, 4 frames in part 2

1. One ranking stage at LLaVA-OneVision-7B shapes (d = 3584, 28 heads, 4 KV heads of 128), 32 frames
   (n = 32*196 video + 100 text entries), float32: the policy's `act` on a PrefillView (the last
   entry's attention row at the layer it precedes, top-k) vs its floor, the products no
   implementation can skip: the layer's input norm and key projection of all n entries with their
   rotary embedding, and the last entry's query. The literal reference's ranking step
   (tests/reference/pdrop.py: a Python sort of the scores) is checked to keep the same set and timed.
2. A whole prefill through the shared driver on a random Qwen2 LLM with 0.5B layer shapes
   (d = 896, m = 4864, 14 heads, 2 KV heads) and 8 layers, F frames + 100 text tokens: prefill time
   without a policy, with PyramidDrop (lambda = 0.5, layers 2, 4, 6), the policy's own time inside it
   (the driver's timer, what the harness reports as compressor time), and the prefill time it saves.

CPU timings are the minimum over interleaved repetitions (the machine's load average is printed).
On a loaded machine, torch's 2 threads wait on each other at every small op (about 10 ms each):
`--threads 1` shows the work itself.
"""

from __future__ import annotations

import sys
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
from methods.pdrop import PyramidDrop


def ranking_view(frames, seed=0):
    """A PrefillView before layer 7 of a 7B-shaped layer stack (only the ranked layer is real)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=3584, intermediate_size=8, num_attention_heads=28,
                         num_key_value_heads=4, num_hidden_layers=28, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(config, layer_idx=7).eval()  # the MLP is not used: kept tiny
    embeds, positions, (start, end) = video_prompt(frames, 3584, seed)
    rotary = Qwen2RotaryEmbedding(config)(embeds, positions)
    n = embeds.shape[1]
    video = torch.arange(start, end)
    view = PrefillView(7, embeds, positions, torch.arange(n), video, start, torch.arange(end, n),
                       _inputs={7: (layer, embeds, rotary)}, _apply_rotary=apply_rotary_pos_emb)
    return view, layer, rotary, apply_rotary_pos_emb


def part_ranking(frames, repeats):
    from tests.reference.pdrop import reference_counts

    view, layer, (cos, sin), rope = ranking_view(frames)
    shape = LLMShape(3584, 18944, 28)
    policy_of = lambda: PyramidDrop().prefill_policy(shape)  # noqa: E731  (fresh per prefill)
    video = len(view.video)
    keep = reference_counts(0.5, video)[0]

    def ours():
        return policy_of().act(view)

    def floor():
        x = layer.input_layernorm(view.hidden)
        attn = layer.self_attn
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        q = attn.q_proj(x[:, -1:]).view(1, 1, -1, attn.head_dim).transpose(1, 2)
        return rope(q, k, cos[:, -1:], sin[:, -1:])[0], rope(k, k, cos, sin)[1]

    scores = view.attention(layer=7)[0, view.video]

    def literal():  # the reference's ranking step on the same scores
        row = scores.tolist()
        return sorted(sorted(range(video), key=lambda i: (-row[i], i))[:keep])

    with torch.inference_mode():
        assert ours().video.tolist() == literal()
        t = best_times({"ours": ours, "floor": floor, "literal": literal}, repeats)
    print(f"1. ranking one stage, 7B shapes, {frames}x196 video + {TEXT} text, float32")
    print(ours_vs_floor(t) + f"   (the literal ranking, a Python sort of the {video} scores: {t['literal']:.1f} ms, same kept set)")
    return t["ours"] / t["floor"]


def prefill(frames, repeats):
    part_prefill("pdrop", PyramidDrop(lambda_=0.5), frames, repeats)


def main() -> None:
    llm_stage_main(__doc__, lambda repeats: part_ranking(32, repeats), prefill, "ranking ours/floor")


if __name__ == "__main__":
    main()
