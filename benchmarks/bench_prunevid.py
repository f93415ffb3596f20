"""Time PruneVid's two stages against their floors and the visual stage against the literal reference.

    python benchmarks/bench_prunevid.py            # 32x196x3584 (CPU, float32), literal at 8x196x3584
    python benchmarks/bench_prunevid.py --quick    # fewer repetitions, literal at 4x196x896

Visual stage (`prunevid_compress`, defaults). Its floor is the dense work no implementation of
PruneVid can skip, on the same input with the same segments and static sets: reading X to
normalise it and to sum unit vectors and tokens per segment (the static test and the temporal
means), and the Gram matrix of every clustered set (the segment's static set, each frame's dynamic
set: (n, n) products over D), from which the DPC distances come, and the merge of each clustered
set into its clusters (one pass over the set, a product with a one-hot matrix). The literal reference
(tests/reference/prunevid.py: float64, Python loops) is timed on a smaller video (it takes
minutes at full size): the ratio is a speed-up, not a target.

Prefill stage (`question_scores`, what the policy adds to the prefill): on a Qwen2-7B-shaped
attention layer (28 heads, 4 key heads, head_dim 128) over a 32-frame prompt, its floor is the key
projection of every token, the query projection of the question tokens and the q.k products.

Target: ours <= ~2x floor. CPU timings: best of interleaved repetitions after a warm-up, on the
threads torch is given (`--threads`, default 2: the harness machine's share).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_times
from methods.core.attention import project
from methods.core.similarity import normalized, segment_ids
from methods.prunevid import (
    MIN_CLUSTERED,
    frame_segments,
    prunevid_compress,
    question_scores,
)
from tests.reference.prunevid import reference_prunevid


def make_input(kind: str, frames: int, per_frame: int, dim: int, seed: int = 0) -> torch.Tensor:
    """still: one scene, 90 % of positions static; scenes: 4 scenes, half static; moving: nothing
    static (fresh tokens every frame)."""
    g = torch.Generator().manual_seed(seed)
    scenes, share = {"still": (1, 0.9), "scenes": (4, 0.5), "moving": (1, 0.0)}[kind]
    bounds = [round(i * frames / scenes) for i in range(scenes + 1)]
    x = torch.empty(frames, per_frame, dim)
    for a, b in zip(bounds[:-1], bounds[1:]):
        offset = 2 * torch.randn(dim, generator=g)
        base = torch.randn(per_frame, dim, generator=g)
        still = torch.rand(per_frame, generator=g) < share
        for t in range(a, b):
            jitter = base + 0.15 * torch.randn(per_frame, dim, generator=g)
            x[t] = offset + torch.where(still[:, None], jitter, torch.randn(per_frame, dim, generator=g))
    return x


def ours(x: torch.Tensor):
    return prunevid_compress(x, generator=torch.Generator().manual_seed(0))


def visual_floor(x: torch.Tensor):
    """The products PruneVid cannot skip, for this input's segments and static sets."""
    segments = frame_segments(x, 0.25, torch.Generator().manual_seed(0))
    frames, n, dim = x.shape
    seg = segment_ids(segments)
    unit = normalized(x)
    sums = torch.zeros(len(segments), n, dim).index_add_(0, seg, unit)
    lengths = torch.tensor([b - a for a, b in segments], dtype=torch.float32)[:, None]
    static = (((sums * sums).sum(-1) - lengths) / (lengths * (lengths - 1)).clamp(min=1)) > 0.8
    sets = []
    for s, (a, b) in enumerate(segments):
        grid = static[s].nonzero().flatten()
        sets.append((a, b, grid, (~static[s]).nonzero().flatten()))

    def run():
        unit = normalized(x)
        sums = torch.zeros(len(segments), n, dim).index_add_(0, seg, unit)
        means = torch.zeros(len(segments), n, dim).index_add_(0, seg, x)
        out = [sums, means]
        for s, (a, b, still, moving) in enumerate(sets):
            for part in (means[s, still][None], x[a:b] if len(still) == 0 else x[a:b, moving]):
                if part.shape[1] >= MIN_CLUSTERED:
                    out.append(part @ part.mT)  # the Gram matrix the distances come from
                    out.append(merge(part))
        return out

    return run


def merge(part: torch.Tensor) -> torch.Tensor:
    """Averaging a set into half as many clusters: one pass over the set (as a scatter of its rows,
    the cheapest form on CPU), whatever the labels are."""
    batch, n, dim = part.shape
    label = (torch.arange(n) % max(1, n // 2)).expand(batch, n)
    sums = torch.zeros(batch, max(1, n // 2), dim)
    return sums.scatter_add_(1, label[:, :, None].expand(-1, -1, dim), part)


def scoring_layer(dim: int = 3584, heads: int = 28, kv_heads: int = 4):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    config = Qwen2Config(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=16, num_hidden_layers=1)
    layer = Qwen2DecoderLayer(config, 0).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def scoring_floor(layer, hidden, queries):
    attn = layer.self_attn

    def run():
        x = layer.input_layernorm(hidden)
        q = project(attn, x[:, queries], "q")[0]
        k = project(attn, x, "k")[0]
        q = q.view(k.shape[0], -1, *q.shape[1:])
        return q @ k[:, None].transpose(-1, -2)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load average "
          f"{os.getloadavg()[0]:.2f}; times in ms (best of {repeats} interleaved runs)")

    print("\nvisual stage, 32x196x3584 float32 (defaults: segment_ratio 0.25, tau 0.8, cluster_ratio 0.5)")
    print(f"{'input':7} {'segments':>8} {'M':>5} {'ours':>8} {'floor':>8} {'ours/floor':>10}")
    worst = 0.0
    with torch.inference_mode():
        for kind in ("still", "scenes", "moving"):
            x = make_input(kind, 32, 196, 3584)
            out = ours(x)
            t = best_times({"ours": lambda x=x: ours(x), "floor": visual_floor(x)}, repeats)
            worst = max(worst, t["ours"] / t["floor"])
            segments = len(frame_segments(x, 0.25, torch.Generator().manual_seed(0)))
            print(f"{kind:7} {segments:8d} {out.tokens.shape[0]:5d} {t['ours']:8.1f} {t['floor']:8.1f} "
                  f"{t['ours'] / t['floor']:10.2f}", flush=True)

        small = (4, 196, 896) if args.quick else (8, 196, 3584)
        x = make_input("scenes", *small)
        start = time.perf_counter()
        ref = reference_prunevid(x, generator=torch.Generator().manual_seed(0))
        literal_ms = (time.perf_counter() - start) * 1e3
        t = best_times({"ours": lambda: ours(x)}, repeats)
        tokens, positions, _, _ = ref.in_position_order()
        out = ours(x)
        same = out.positions.tolist() == positions and torch.allclose(out.tokens.double(), tokens, rtol=1e-4, atol=1e-4)
        print(f"\nliteral reference at {'x'.join(map(str, small))} (scenes): literal {literal_ms:.0f} ms, "
              f"ours {t['ours']:.1f} ms, literal/ours {literal_ms / t['ours']:.0f}x, outputs "
              f"{'same' if same else 'DIFFER'} (decision margin {ref.margin:.1e})")

        print("\nprefill scoring, Qwen2-7B attention shape, 32 frames: video tokens + 100 text, 60 queries")
        layer = scoring_layer()
        total, video = 32 * 196 // 2 + 100, 32 * 196 // 2  # after the default visual stage: about half
        hidden = torch.randn(1, total, 3584, generator=torch.Generator().manual_seed(1))
        queries = torch.arange(total - 60, total)
        keys = torch.arange(20, 20 + video)
        t = best_times({"ours": lambda: question_scores(layer, hidden, queries, keys),
                        "floor": scoring_floor(layer, hidden, queries)}, repeats)
        print(f"ours {t['ours']:.1f} ms, floor {t['floor']:.1f} ms, ours/floor {t['ours'] / t['floor']:.2f}")
        worst = max(worst, t["ours"] / t["floor"])
    print(f"\nworst ours/floor {worst:.2f} (target <= ~2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
