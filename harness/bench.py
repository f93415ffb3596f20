"""Cost of each method on the current device: vision encoder, compressor, prefill, decode.

    python -m harness.bench [--model PATH] [--frames 8] [--videos 4] [--repeats 3]
                            [--methods none scissor:tau=0.9 uniform:retention=0.25 ...]

Defaults: the embedded smoke model and videos. Times are medians over videos x repeats after one
warm-up answer per method (CUDA events on a GPU, perf_counter on CPU); the last column is the
compressor's time as a share of the LLM prefill it shortens.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import pandas as pd
import torch

import methods
from harness.llava import LlavaOneVision
from harness.video import read_frames

DEFAULT_METHODS = ["none", "scissor:tau=0.9", "uniform:retention=0.25", "topk:retention=0.25",
                   "fastv:keep=0.25"]


def parse_method(spec: str):
    """'scissor:tau=0.9,epsilon=0.05' -> ('scissor', {'tau': 0.9, 'epsilon': 0.05});
    'uniform:retention=0.5+fastv:keep=0.3' -> a pipeline of the two."""
    if "+" in spec:
        parts = [parse_method(part) for part in spec.split("+")]
        return "pipeline", {"stages": [n for n, _ in parts], **{n: k for n, k in parts}}
    name, _, knobs = spec.partition(":")
    parsed = {}
    for item in filter(None, knobs.split(",")):
        key, _, value = item.partition("=")
        parsed[key] = int(value) if value.isdigit() else float(value)
    return name, parsed


def bench(adapter: LlavaOneVision, videos: list[Path], specs: list[str], frames: int, repeats: int):
    p = adapter.preprocessing
    pixels = [p.apply(read_frames(v, frames)) for v in videos]
    question = "What colour is the moving square?\nA. red\nB. green\nC. blue\nD. white\nAnswer:"
    rows = []
    for spec in specs:
        name, knobs = parse_method(spec)
        compressor = methods.build(name, **knobs)
        adapter.generate(pixels[0], question, compressor, max_new_tokens=4)  # warm-up
        runs = [adapter.generate(px, question, compressor, max_new_tokens=4)[1]
                for _ in range(repeats) for px in pixels]
        med = {k: statistics.median(r.timings.get(k, 0.0) for r in runs)
               for k in ("vision", "compressor", "prefill", "decode")}
        rows.append({
            "method": spec, "tokens in": runs[0].video_tokens_in,
            "tokens out": statistics.median(r.video_tokens_out for r in runs),
            **{f"{k} ms": round(1000 * v, 2) for k, v in med.items()},
            "compressor / prefill": f"{100 * med['compressor'] / med['prefill']:.1f}%",
        })
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    cache = Path(os.environ.get("VTC_CACHE", ".cache"))
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the smoke model)")
    parser.add_argument("--video-dir", type=Path, default=None, help="directory of .mp4 files")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    args = parser.parse_args(argv)
    if args.model is None:
        from harness.tiny_model import build_tiny_model

        args.model = str(build_tiny_model(cache / "models" / "tiny-llava-onevision"))
    if args.video_dir is None:
        from harness.smoke_data import generate

        args.video_dir = generate(cache / "data" / "vtc_smoke").parent / "videos"
    videos = sorted(args.video_dir.glob("*.mp4"))[: args.videos]
    adapter = LlavaOneVision(args.model, dtype=args.dtype, device=args.device)
    table = bench(adapter, videos, args.methods, args.frames, args.repeats)
    device = torch.cuda.get_device_name() if adapter.device.type == "cuda" else "CPU"
    print(f"{args.model} | {args.frames} frames | {len(videos)} videos x {args.repeats} | {device}\n")
    print(table.to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
