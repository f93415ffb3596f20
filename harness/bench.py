"""What each method costs and saves, measured in one run on the current device.

    python -m harness.bench [model=llava_ov_0.5b model.random_init=true ...] [--frames 4]
                            [--methods none scissor:tau=0.9 uniform:retention=0.25 ...]
                            [--retentions 0.5 0.25 0.1] [--videos 2] [--repeats 2] [--out DIR]

Positional `key=value` arguments select and configure the model as for `python -m harness`
(default: the embedded model). `--methods` takes `name[:knob=v,...]` (`a:..+b:..` stacks them);
with `--retentions`, every method named without knobs runs at each retention, its declared knob
set directly or searched on the bench videos (as `retention=` does in a run).

Per method: vision, compressor, prefill, TTFT (call to first token) and decode per token (medians
over videos x repeats after one warm-up, CUDA events on a GPU, perf_counter on CPU); peak memory
(CUDA max_memory_allocated; CPU the peak RSS above the start of the answer, sampled every 2 ms);
analytic FLOPs of the vision encoder, of the compressor where modelled, and of the LLM prefill; and
the ratios to `none` measured in the same run: prefill and TTFT speedup, memory ratio, and the
compressor's time as a share of the prefill time it saves. `--out DIR` writes bench.csv, bench.md
and speedup_vs_retention.png there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch

import methods
from harness.llava import LlavaOneVision
from harness.video import read_frames
from methods.flops import LLMShape, encoder_flops, prefill_flops

DEFAULT_METHODS = ["none", "scissor:tau=0.9", "uniform:retention=0.25", "topk:retention=0.25",
                   "fastv:keep=0.25"]
QUESTION = "What colour is the moving square?\nA. red\nB. green\nC. blue\nD. white\nAnswer:"


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
        try:
            parsed[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            parsed[key] = value
    return name, parsed


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocations, or the process RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(spec: str, retention: float | None, adapter, pixels, text_tokens: int):
    """The compressor a spec names, at `retention` (its declared knob set or searched on `pixels`)."""
    name, knobs = parse_method(spec)
    compressor = methods.build(name, **knobs)
    if retention is None or compressor.reference:
        return compressor, spec
    mapping = compressor.retention_knob
    if mapping is None:
        raise ValueError(f"--retentions: {name} has no retention to set")
    if mapping.direct:
        return compressor.with_knob(mapping.knob, retention), f"{spec} r={retention:g}"
    from harness.calibrate import CalibrationSet, search

    visual = [adapter.encode(px, compressor.needs)[0] for px in pixels] if compressor.has("visual") else None
    data = CalibrationSet([text_tokens] * len(pixels), pixels[0].shape[0] * adapter.tokens_per_frame, visual)
    found = search(compressor, retention, data, LLMShape.of(adapter.config.text_config))
    for knob, value in found["knobs"].items():
        compressor = compressor.with_knob(knob, value)
    return compressor, f"{spec} r={retention:g}"


def measure(adapter: LlavaOneVision, compressor, pixels, repeats: int, max_new_tokens: int) -> dict:
    adapter.generate(pixels[0], QUESTION, compressor, max_new_tokens=max_new_tokens)  # warm-up
    runs, memory = [], []
    for _ in range(repeats):
        for px in pixels:
            with PeakMemory(adapter.device) as peak:
                runs.append(adapter.generate(px, QUESTION, compressor, max_new_tokens=max_new_tokens)[1])
            memory.append(peak.bytes)
    med = {k: statistics.median(r.timings.get(k, 0.0) for r in runs)
           for k in ("vision", "compressor", "prefill", "ttft", "decode")}
    steps = statistics.median(r.decode_steps for r in runs)
    run = runs[0]
    shape = LLMShape.of(adapter.config.text_config)
    frames = run.video_tokens_in // adapter.tokens_per_frame
    compressor_flops = compressor.flops(frames, adapter.tokens_per_frame, shape.hidden)
    return {
        "rho_tok": statistics.median(r.video_tokens_out / r.video_tokens_in for r in runs),
        "tokens out": statistics.median(r.video_tokens_out for r in runs),
        **{f"{k} ms": 1000 * v for k, v in med.items() if k != "decode"},
        "decode ms/token": 1000 * med["decode"] / steps if steps else float("nan"),
        "peak MB": statistics.median(memory) / 2**20,
        "vision TFLOPs": encoder_flops(adapter.config.vision_config, frames, shape.hidden) / 1e12,
        "compressor GFLOPs": compressor_flops / 1e9 if compressor_flops is not None else float("nan"),
        "prefill TFLOPs": prefill_flops(run.text_tokens, run.layer_video_tokens, shape,
                                        run.layer_mlp_video_tokens) / 1e12,
    }


def with_ratios(rows: list[dict]) -> pd.DataFrame:
    """Ratios to the `none` row of the same run."""
    table = pd.DataFrame(rows)
    ref = table[table["method"] == "none"]
    if ref.empty:
        return table
    ref = ref.iloc[0]
    saved = ref["prefill ms"] - table["prefill ms"]
    table["prefill speedup"] = ref["prefill ms"] / table["prefill ms"]
    table["TTFT speedup"] = ref["ttft ms"] / table["ttft ms"]
    table["memory ratio"] = table["peak MB"] / ref["peak MB"] if ref["peak MB"] > 0 else float("nan")
    table["compressor / saved prefill"] = (table["compressor ms"] / saved).where(saved > 0)
    return table


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, column in zip(axes, ("prefill speedup", "TTFT speedup")):
        for method, part in table[table["method"] != "none"].groupby("method"):
            part = part.sort_values("rho_tok")
            ax.plot(100 * part["rho_tok"], part[column], marker="o", label=method)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("achieved token retention (%)")
        ax.set_ylabel(f"{column} vs none (x)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def load_model(overrides: list[str], model_path: str | None, dtype: str | None, device: str):
    """The adapter for `--model PATH`, or for the Hydra model config the overrides select."""
    if model_path is not None:
        return LlavaOneVision(model_path, dtype=dtype or "float32", device=device), Path(model_path).name
    from hydra import compose, initialize_config_dir

    import harness.config  # noqa: F401  (schemas and resolvers)
    from harness.run import CONF, prepare_model

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    path = prepare_model(cfg)
    adapter = LlavaOneVision(path, dtype=dtype or cfg.model.dtype, device=device,
                             attn_implementation=cfg.model.attn_implementation)
    return adapter, cfg.model.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="model=... model.random_init=true (as for the harness)")
    parser.add_argument("--model", default=None, help="a model directory instead of a config")
    parser.add_argument("--video-dir", type=Path, default=None, help="directory of .mp4 files")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--retentions", nargs="+", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    adapter, name = load_model(args.overrides, args.model, args.dtype, args.device)
    if args.video_dir is None:
        from harness.smoke_data import generate

        args.video_dir = generate(Path(os.environ.get("VTC_CACHE", ".cache")) / "data" / "vtc_smoke").parent / "videos"
    videos = sorted(args.video_dir.glob("*.mp4"))[: args.videos]
    pixels = [adapter.preprocessing.apply(read_frames(v, args.frames)) for v in videos]
    text = len(adapter.prompt_ids(QUESTION)[0])
    rows = []
    for spec in args.methods:
        has_knobs = ":" in spec or "+" in spec
        targets = [None] if has_knobs or args.retentions is None or spec == "none" else args.retentions
        for retention in targets:
            try:
                compressor, label = build(spec, retention, adapter, pixels, text)
            except ValueError as err:  # e.g. a retention below what the method can reach
                print(f"skipped {spec} at retention {retention}: {err}", file=sys.stderr)
                continue
            rows.append({"method": parse_method(spec)[0] if retention is not None else spec.split(":")[0],
                         "setting": label, **measure(adapter, compressor, pixels, args.repeats,
                                                     args.max_new_tokens)})
    table = with_ratios(rows)
    device = torch.cuda.get_device_name() if adapter.device.type == "cuda" else "CPU"
    print(f"{name} | {args.frames} frames | {len(videos)} videos x {args.repeats} | "
          f"{adapter.model.dtype} | {device} ({torch.get_num_threads()} threads)\n")
    print(table.drop(columns=["method"]).to_markdown(index=False, floatfmt=".3g"))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "bench.csv", index=False)
        (args.out / "bench.md").write_text(table.to_markdown(index=False, floatfmt=".3g") + "\n")
        plot(table, args.out / "speedup_vs_retention.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
