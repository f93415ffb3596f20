"""What the benchmark scripts share: timing loops, the random Qwen2 LLM and video prompt of the
LLM-stage scripts, their whole-prefill part and their command line. Not a script itself (the
scripts are benchmarks/bench_*.py); they import it after putting the repository on sys.path."""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import torch

from methods.core import decoder
from methods.core.flops import retention_numbers

TEXT = 100  # text entries around the video in `video_prompt`
SCENE_LENGTHS = [1, 3, 10, 4, 2, 6, 1, 5]  # 32 frames


# ---- timing ---------------------------------------------------------------------------------------
def best_times(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Minimum time (ms, by `clock`; default wall time) of each function over interleaved
    repetitions, after a warm-up."""
    best = {}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best.get(name, float("inf")), (clock() - start) * 1e3)
    return best


def wall_and_cpu_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Minimum wall time and minimum process CPU time (ms) of each function over interleaved
    repetitions, after a warm-up. On a shared machine the wall time includes the time the process
    waits for a core; the CPU time counts only what it ran (both threads)."""
    wall, cpu = {}, {}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall.get(name, float("inf")), (time.perf_counter() - start) * 1e3)
            cpu[name] = min(cpu.get(name, float("inf")), (time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def cuda_times(fns: dict, repeats: int) -> dict:
    """Minimum CUDA-event time (ms) of each function over interleaved repetitions, after two warm-ups."""
    best = {}
    for fn in fns.values():
        fn()
        fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best[name] = min(best.get(name, float("inf")), start.elapsed_time(end))
    return best


def once(fn) -> tuple[float, object]:
    """(wall time in ms, result) of one call of `fn`."""
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e3, out


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


# ---- inputs ---------------------------------------------------------------------------------------
def scene_lengths(kind: str, frames: int) -> list[int]:
    """Frames per scene of a synthetic video: one frame each for `kind` "cuts", else SCENE_LENGTHS
    repeated and cut at `frames`."""
    if kind == "cuts":
        return [1] * frames
    lengths, total = [], 0
    for length in SCENE_LENGTHS * 4:
        length = min(length, frames - total)
        if length <= 0:
            break
        lengths.append(length)
        total += length
    return lengths


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


# ---- the LLM-stage scripts' second part and command line ----------------------------------------
def part_prefill(name: str, compressor, frames: int, repeats: int, mlp: bool = False, **prefill_kwargs) -> None:
    """Part 2 of the LLM-stage scripts: a whole prefill through the shared driver on a random Qwen2
    LLM with 0.5B layer shapes and 8 layers, `frames` x 196 video + TEXT text tokens, without a
    policy and with `compressor`'s (printed as `name`); the policy's own time inside it (the driver's
    timer, what the harness reports as compressor time) and the prefill time it saves. `mlp`: the
    policy also thins the MLPs' video tokens (counted in rho_flops, printed apart);
    `prefill_kwargs` go to decoder.prefill with the policy."""
    _model, llm = qwen2(896, 4864, 8, 14, 2)  # the model holds the layers the handle uses
    shape = llm.shape
    embeds, positions, span = video_prompt(frames, 896)
    video = span[1] - span[0]
    watch = Stopwatch()
    counts = {}

    def none():
        return decoder.prefill(llm, embeds, positions, span, None, logits_to_keep=1)

    def policy():
        out = decoder.prefill(llm, embeds, positions, span, compressor.prefill_policy(shape), logits_to_keep=1,
                              timer=watch, **prefill_kwargs)
        counts["layers"], counts["mlp"] = out.layer_video_tokens, out.layer_mlp_video_tokens
        return out

    with torch.inference_mode():
        t = best_times({"none": none, name: policy}, repeats)
        watch.total = 0.0
        policy()
        policy_ms = watch.total * 1e3
    mlp_counts = (counts["mlp"],) if mlp else ()
    flops = retention_numbers(video, embeds.shape[1] - video, counts["layers"], shape, *mlp_counts)["rho_flops"]
    saved = t["none"] - (t[name] - policy_ms)
    tokens = f"attention {counts['layers']}, MLP {counts['mlp']}" if mlp else f"layers {counts['layers']}"
    print(f"2. prefill, random Qwen2 with 0.5B layer shapes, 8 layers, {frames}x196 video + {TEXT} text")
    print(f"   none {t['none']:8.1f} ms   {name} {t[name]:8.1f} ms (rho_flops {flops:.3f}, {tokens})")
    print(f"   policy's own time {policy_ms:.1f} ms = {100 * policy_ms / t[name]:.1f}% of its prefill; "
          f"LLM time saved {saved:.1f} ms; policy/saved {policy_ms / saved:.3f}")


def ours_vs_floor(t: dict) -> str:
    """The row part 1 of the LLM-stage scripts prints: ours, floor and their ratio."""
    return f"   ours {t['ours']:8.1f} ms   floor {t['floor']:8.1f} ms   ours/floor {t['ours'] / t['floor']:.2f}"


def llm_stage_main(doc: str, first, prefill, label: str) -> None:
    """The LLM-stage scripts' main: --quick (fewer repetitions, 4 frames in part 2) and --threads;
    `first(repeats)` (part 1, returning its ours/floor), `prefill(frames, repeats)` (part 2), then
    `label` with that ratio against the target."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 4 frames in part 2")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load average "
          f"{os.getloadavg()[0]:.2f}; times: best of {repeats} interleaved runs")
    ratio = first(repeats)
    prefill(4 if args.quick else 8, repeats)
    print(f"\n{label} {ratio:.2f} (target <= 2); load average {os.getloadavg()[0]:.2f}")
