"""Time `cdpruner_compress` (methods/cdpruner.py) against its dense floor, the official loop and the
literal reference.

    python benchmarks/bench_cdpruner.py            # 32x196x3584, 20 question tokens, r = 0.1, 0.25, 0.5,
                                                   # scope video once
    python benchmarks/bench_cdpruner.py --quick    # r = 0.25 only, fewer repetitions, no scope video

floor: the dense work no implementation can skip on the same input: the norms of X, the (F, N, N)
cosine products of every frame's tokens (one product of X scaled by the inverse norms; the DPP kernel
needs all of them: the first pick reads the whole diagonal and each pick a whole kernel row), the
(F*N, D) x (D, M) relevance product with the question's tokens, and copying the kept rows out. Ours adds the kernel scaling and the k greedy
steps (each one batched (1 x t)(t x N) product: O(k^2 N) in all, as the official code).
Comparators (their kept sets are compared with ours, in float64):
  official  the official `encode_images` with tensor ops (cis as a (T, B, N) tensor, einsum per step,
            no candidate threshold) on the same inputs: the official code's cost;
  literal   tests/reference/cdpruner.py: Python loops, float64, at 8x196x256 with 20 question tokens
            (its relevance loops over D: minutes at 32x196x3584).
scope=video (without --quick): one run of ours and of its floor (one (F*N)^2 product).
CPU timings: the minimum over interleaved repetitions after a warm-up (other processes share the
machine: the load average is printed). 2 threads. OMP_WAIT_POLICY=PASSIVE unless the environment sets
it (see benchmarks/bench_divprune.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see above)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_times, once
from methods.cdpruner import cdpruner_compress
from tests.reference.cdpruner import reference_cdpruner

FRAMES, TOKENS, DIM, WORDS = 32, 196, 3584, 20


def make_input(frames: int, per_frame: int, dim: int, words: int, seed: int = 0):
    """Video-like tokens (a few hundred shared objects plus noise) and a question of random token embeddings."""
    g = torch.Generator().manual_seed(seed)
    objects = torch.randn(256, dim, generator=g)
    pick = torch.randint(0, 256, (frames, per_frame), generator=g)
    x = objects[pick] + 0.5 * torch.randn(frames, per_frame, dim, generator=g)
    return x, torch.randn(words, dim, generator=g)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norms > 0, norms, 1.0)


def floor_fn(x: torch.Tensor, question: torch.Tensor, keep: int):
    def run():
        norms = torch.linalg.vector_norm(x, dim=-1)
        inverse = torch.where(norms > 0, norms.reciprocal(), 0.0)
        similarity = torch.bmm(x, x.mT).mul_(inverse[:, :, None]).mul_(inverse[:, None, :])
        relevance = (x.reshape(-1, x.shape[-1]) @ unit_rows(question).T) * inverse.reshape(-1, 1)
        return similarity, relevance, x.reshape(-1, x.shape[-1])[:keep].clone()
    return run


def official_select(image_features: torch.Tensor, text_embeds: torch.Tensor, visual_token_num: int) -> torch.Tensor:
    """The official `encode_images` selection (image_embeds = image_features), (B, N, C) -> (B, N) mask."""
    B, N, C = image_features.shape
    device = image_features.device
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float() if image_features.dtype != torch.float64 else image_normalized
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_features / image_features.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N), device=device, dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    select_idx = torch.sort(select_idx.t()).values
    return torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, select_idx, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="r = 0.25 only, fewer repetitions, no scope video")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retentions = [0.25] if args.quick else [0.1, 0.25, 0.5]
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average {os.getloadavg()[0]:.2f}")
    x, question = make_input(FRAMES, TOKENS, DIM, WORDS)
    x64, question64 = x.double(), question.double()
    header = (f"{'shape':12} {'r':>5} {'k':>4} {'ours ms':>8} {'floor ms':>8} {'official':>9} "
              f"{'ours/floor':>10} {'off/ours':>8}  kept vs official (float64)")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for retention in retentions:
        k = max(1, round(retention * TOKENS))
        t = best_times({"ours": lambda: cdpruner_compress(x, question, retention),
                        "floor": floor_fn(x, question, FRAMES * k),
                        "official": lambda: official_select(x, question, k)}, repeats)
        keep = cdpruner_compress(x64, question64, retention).positions
        same = torch.equal(official_select(x64, question64, k).flatten().nonzero().flatten(), keep)
        worst = max(worst, t["ours"] / t["floor"])
        print(f"{f'{FRAMES}x{TOKENS}x{DIM}':12} {retention:5.2f} {k:4d} {t['ours']:8.0f} {t['floor']:8.0f} "
              f"{t['official']:9.0f} {t['ours'] / t['floor']:10.2f} {t['official'] / t['ours']:8.1f}  "
              f"{'same' if same else 'DIFFER'}", flush=True)
    if not args.quick:
        k = round(0.25 * FRAMES * TOKENS)
        ours_ms, out = once(lambda: cdpruner_compress(x, question, 0.25, scope="video"))
        floor_ms, _ = once(floor_fn(x.reshape(1, -1, DIM), question, k))
        print(f"\nscope=video, r=0.25, k={k} (one run each): ours {ours_ms:.0f} ms, "
              f"floor ({FRAMES * TOKENS}^2 product) {floor_ms:.0f} ms = {ours_ms / floor_ms:.1f}x; "
              f"{out.tokens.shape[0]} kept")

    small, words = make_input(8, TOKENS, 256, WORDS, seed=1)
    small64 = small.double()
    ours_ms = best_times({"ours": lambda: cdpruner_compress(small, words, 0.25)}, 5)["ours"]
    literal_ms, ref = once(lambda: reference_cdpruner(small64, words.double(), 0.25))
    same = cdpruner_compress(small64, words.double(), 0.25).positions.tolist() == ref.keep
    print(f"\nliteral (Python loops, float64) at 8x{TOKENS}x256, {WORDS} question tokens, r=0.25: {literal_ms:.0f} ms "
          f"vs ours {ours_ms:.1f} ms = {literal_ms / ours_ms:.0f}x; kept {'same' if same else 'DIFFER'} "
          f"(pick gap {ref.gap:.0e})")
    print(f"worst ours/floor (scope frame) {worst:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
