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

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.core import decoder
from methods.core.decoder import PrefillView
from methods.core.flops import LLMShape, retention_numbers
from methods.pdrop import PyramidDrop

TEXT = 100


def qwen2(hidden, ffn, layers, heads, kv_heads, vocab=1024, seed=0):
    """A random Qwen2 causal LM (SDPA) and the driver's handle on it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).eval()
    lm = model.model
    return model, decoder.LLM(embed=lm.embed_tokens, layers=lm.layers, rotary=lm.rotary_emb, norm=lm.norm,
                              head=model.lm_head, config=config, apply_rotary=apply_rotary_pos_emb)


def video_prompt(frames, dim, seed=0, static=0.5):
    """(1, n, dim) embeddings: TEXT/2 text entries, F*196 video entries (a share `static` of the grid
    positions repeat with small noise across frames, the rest change), TEXT/2 text entries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(196, dim, generator=g)
    noise = torch.where(torch.rand(196, generator=g) < static, 0.05, 2.0)
    video = base[None] + noise[None, :, None] * torch.randn(frames, 196, dim, generator=g)
    text = torch.randn(TEXT, dim, generator=g)
    embeds = torch.cat([text[:TEXT // 2], video.flatten(0, 1), text[TEXT // 2:]])[None] * 0.02
    start = TEXT // 2
    return embeds, torch.arange(embeds.shape[1])[None], (start, start + frames * 196)


class Stopwatch:
    """The driver's `timer`: accumulates the time spent inside the policy."""

    def __init__(self):
        self.total = 0.0

    @contextmanager
    def __call__(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.total += time.perf_counter() - start


def best_times(fns: dict, repeats: int) -> dict:
    """Minimum wall time (ms) of each function over interleaved repetitions, after a warm-up."""
    best = {}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) * 1e3)
    return best


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
    print(f"   ours {t['ours']:8.1f} ms   floor {t['floor']:8.1f} ms   ours/floor {t['ours'] / t['floor']:.2f}"
          f"   (the literal ranking, a Python sort of the {video} scores: {t['literal']:.1f} ms, same kept set)")
    return t["ours"] / t["floor"]


def part_prefill(frames, repeats):
    model, llm = qwen2(896, 4864, 8, 14, 2)
    shape = llm.shape
    embeds, positions, span = video_prompt(frames, 896)
    video = span[1] - span[0]
    compressor = PyramidDrop(lambda_=0.5)
    watch = Stopwatch()
    counts = {}

    def none():
        return decoder.prefill(llm, embeds, positions, span, None, logits_to_keep=1)

    def pdrop():
        out = decoder.prefill(llm, embeds, positions, span, compressor.prefill_policy(shape), logits_to_keep=1,
                              timer=watch)
        counts["layers"] = out.layer_video_tokens
        return out

    with torch.inference_mode():
        t = best_times({"none": none, "pdrop": pdrop}, repeats)
        watch.total = 0.0
        pdrop()
        policy_ms = watch.total * 1e3
    flops = retention_numbers(video, embeds.shape[1] - video, counts["layers"], shape)["rho_flops"]
    saved = t["none"] - (t["pdrop"] - policy_ms)
    print(f"2. prefill, random Qwen2 with 0.5B layer shapes, 8 layers, {frames}x196 video + {TEXT} text")
    print(f"   none {t['none']:8.1f} ms   pdrop {t['pdrop']:8.1f} ms (rho_flops {flops:.3f}, layers "
          f"{counts['layers']})")
    print(f"   policy's own time {policy_ms:.1f} ms = {100 * policy_ms / t['pdrop']:.1f}% of its prefill; "
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
    ratio = part_ranking(32, repeats)
    part_prefill(4 if args.quick else 8, repeats)
    print(f"\nranking ours/floor {ratio:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
