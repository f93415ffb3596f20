"""What each method costs and saves, measured in one run on the current device.

    python -m harness.bench [model=llava_ov_0.5b model.random_init=true ...] [--frames 4]
                            [--methods none scissor:tau=0.9 uniform:retention=0.25 ...]
                            [--retentions 0.5 0.25 0.1] [--videos 2] [--repeats 2] [--out DIR]

    python -m harness.bench --features 32x196x3584 [--methods ...] [--retentions 0.25]

`--features FxNxD` times only each method's own work at that size, without a model: a visual
stage on clustered synthetic features (with encoder scores, keys and states as methods ask), a
prefill policy's first act on a sequence of F*N video + 64 text tokens through one random decoder
layer of that width (LLaVA-OneVision-7B's heads for D = 3584), and the share of the LLM prefill of
that many tokens it would cost (analytic FLOPs of a 28-layer LLM of that width, timed by one layer).

Positional `key=value` arguments select and configure the model as for `python -m harness`
(default: the embedded model). `--methods` takes `name[:knob=v,...]` (`a:..+b:..` stacks them);
with `--retentions`, every method named without knobs runs at each retention, its declared knob
set directly or searched on the bench videos (as `retention=` does in a run).

Per method: vision, compressor, prefill, TTFT (call to first token) and decode per token (medians
over videos x repeats after one warm-up, CUDA events on a GPU, perf_counter on CPU); peak memory
(CUDA max_memory_allocated; CPU the peak RSS above the start of the answer, sampled every 2 ms);
analytic FLOPs of the vision encoder (each layer at its tokens under an encoder-stage method such as
ToMe), of the compressor where modelled, and of the LLM prefill; and
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

from harness.models.base import VideoLLM
from methods.core.base import encoder_stage
from methods.core.flops import LLMShape, prefill_flops

DEFAULT_METHODS = ["none", "scissor", "fastv", "topk", "uniform", "pllava", "visionzip", "dycoke", "vidcom2",
                   "fastvid", "holitom", "prunevid", "divprune", "pdrop", "framefusion", "flashvid", "vispruner",
                   "cdpruner", "evs", "dart", "sparsevlm", "sttm"]
DEFAULT_RETENTIONS = [0.25]  # methods named without knobs run at these (--retentions)
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
    import psutil

    return psutil.Process().memory_info().rss


def build(spec: str, retention: float | None, visual, full_video: int, text_tokens: int, shape: LLMShape,
          vision=None):
    """The compressor a spec names, at `retention`: its declared knob set directly (checked as a run
    checks it: an encoder stage against its plan on `vision`, the model's VisionShape), or searched
    as `retention=` does in a run, on the videos `visual(needs)` encodes (a list of VisualInput)."""
    from harness.run.calibrate import CalibrationSet, check_reachable, search
    from harness.run.method import choose_method

    name, knobs = parse_method(spec)
    choice = choose_method({"name": name, **knobs}, retention=retention)
    compressor = choice.compressor
    if retention is None or compressor.reference:
        return compressor, spec

    def calibration() -> CalibrationSet:
        videos = visual(compressor.needs) if compressor.has("visual") else None
        count = len(videos) if videos is not None else 1
        return CalibrationSet([text_tokens] * count, [full_video] * count, videos)

    if choice.target_retention is None:  # its declared knob took the retention directly: reachable as in a run
        check_reachable(compressor, retention, vision, calibration)
        return compressor, f"{spec} r={retention:g}"

    found = search(compressor, retention, calibration(), shape)
    for knob, value in found["knobs"].items():
        compressor = compressor.with_knob(knob, value)
    return compressor, f"{spec} r={retention:g}"


def measure(adapter: VideoLLM, compressor, pixels, repeats: int, max_new_tokens: int) -> dict:
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
    shape = adapter.llm_shape
    compressor_flops = compressor.flops(run.frames, run.frame_tokens, shape.hidden)
    return {
        "rho_tok": statistics.median(r.video_tokens_out / r.video_tokens_in for r in runs),
        "tokens out": statistics.median(r.video_tokens_out for r in runs),
        **{f"{k} ms": 1000 * v for k, v in med.items() if k != "decode"},
        "decode ms/token": 1000 * med["decode"] / steps if steps else float("nan"),
        "peak MB": statistics.median(memory) / 2**20,
        "vision TFLOPs": vision_flops(adapter, compressor, run) / 1e12,
        "compressor GFLOPs": compressor_flops / 1e9 if compressor_flops is not None else float("nan"),
        "prefill TFLOPs": prefill_flops(run.text_tokens, run.layer_video_tokens, shape,
                                        run.layer_mlp_video_tokens) / 1e12,
    }


def vision_flops(adapter: VideoLLM, compressor, run) -> float:
    """The vision encoder's FLOPs for this run; an encoder-stage method (ToMe) shrinks the encoder's
    own work, counted layer by layer by the adapter (only a family running that stage is asked)."""
    encoder = encoder_stage(compressor.needs)
    if encoder is None:
        return adapter.vision_flops(run.frames, run.grid)
    return adapter.vision_flops(run.frames, run.grid, encoder=encoder)


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


def synthetic_visual(frames: int, tokens: int, dim: int, seed: int = 0):
    """Features of a few objects shared across frames (token = centroid + noise), with the encoder
    inputs methods may ask for (27x27 patch scores and keys, 1152-wide encoder states)."""
    from methods.core.base import VisualInput

    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(64, dim, generator=g)
    pick = torch.multinomial(torch.arange(1, 65, dtype=torch.float64) ** -1.0, frames * tokens,
                             replacement=True, generator=g)
    features = centroids[pick].view(frames, tokens, dim) + 0.3 * torch.randn(frames, tokens, dim, generator=g)
    patches = 729
    return VisualInput(features, (int(tokens ** 0.5),) * 2,
                       patch_scores=torch.rand(frames, patches, generator=g).softmax(-1),
                       patch_keys=torch.randn(frames, patches, 72, generator=g),
                       encoder_hidden=torch.randn(frames, patches, 1152, generator=g))


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compressors_only(specs: list[str], retentions: list[float] | None, shape: tuple[int, int, int],
                     repeats: int) -> pd.DataFrame:
    """Each method's own work at F x N x D, and its share of the LLM prefill of that many tokens."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2RMSNorm,
        Qwen2RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    from methods.core.decoder import PrefillView

    frames, tokens, dim = shape
    visual = synthetic_visual(frames, tokens, dim)
    heads = max(1, dim // 128)
    config = Qwen2Config(hidden_size=dim, intermediate_size=int(dim * 5.29), num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 7), num_hidden_layers=28)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(config, 0).eval()
    norm = Qwen2RMSNorm(dim).eval()
    side = round(tokens ** 0.5)
    text = 64
    n = frames * tokens + text
    hidden = torch.randn(1, n, dim) * 0.02
    positions = torch.arange(n)[None]
    rotary = Qwen2RotaryEmbedding(config)(hidden, positions)
    with torch.no_grad():
        layer_time = _median_time(lambda: layer(hidden, attention_mask=None, position_embeddings=rotary),
                                  max(1, repeats // 2))
    llm = LLMShape(dim, config.intermediate_size, 28)
    rows = []
    for spec in specs:
        name, knobs = parse_method(spec)
        for retention in ([None] if ":" in spec or name == "none" or not retentions else retentions):
            try:
                compressor, label = build(spec, retention, lambda needs: [visual], frames * tokens, text, llm)
            except ValueError as err:
                print(f"skipped {spec} at retention {retention}: {err}", file=sys.stderr)
                continue
            row = {"method": name, "setting": label}
            with torch.no_grad():
                if compressor.has("visual"):
                    row["visual ms"] = 1000 * _median_time(lambda: compressor.compress(visual), repeats)
                if compressor.has("prefill"):
                    planned = compressor.prefill_policy(llm)
                    sites = sorted({(at, False) for at in planned.layers}
                                   | {(at, True) for at in getattr(planned, "mid_layers", ())})

                    def act():
                        # every act of one prefill, each on the whole sequence (an upper bound: the
                        # sequence a later act sees is shorter)
                        policy = compressor.prefill_policy(llm)
                        for at, mid in sites:
                            inputs = {max(0, at - 1): (layer, hidden, rotary), at: (layer, hidden, rotary)}
                            view = PrefillView(at, hidden, positions, torch.arange(n), torch.arange(frames * tokens),
                                               0, torch.arange(frames * tokens, n), mid, None,
                                               torch.arange(frames * tokens), tokens, inputs,
                                               apply_rotary_pos_emb, grid=(side, side), _norm=norm)
                            policy.act(view)

                    row["prefill policy ms"] = 1000 * _median_time(act, repeats)
            own = row.get("visual ms", 0.0) + row.get("prefill policy ms", 0.0)
            row["share of the full prefill"] = own / (1000 * 28 * layer_time)
            flops = compressor.flops(frames, tokens, dim)
            row["compressor GFLOPs"] = flops / 1e9 if flops is not None else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def load_model(overrides: list[str], model_path: str | None, dtype: str | None, device: str):
    """The adapter for `--model PATH`, or for the Hydra model config the overrides select."""
    from harness.models import adapter_class, family_of

    if model_path is not None:
        return (adapter_class(family_of(model_path))(model_path, dtype=dtype or "float32", device=device),
                Path(model_path).name)
    from harness.models.prepare import model_directory
    from harness.run.config import compose_config
    from harness.run.job import job_from_config

    job = job_from_config(compose_config(overrides))
    model = job.model
    path = model_directory(model, job.cache_dir, job.seed, progress=False)
    adapter = adapter_class(model.family)(path, dtype=dtype or model.dtype, device=device,
                                          attn_implementation=model.attn_implementation)
    return adapter, model.name


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
    parser.add_argument("--retentions", nargs="+", type=float, default=DEFAULT_RETENTIONS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--features", default=None, help="FxNxD: time each method's own work only")
    args = parser.parse_args(argv)
    from harness.quiet import quiet_libraries

    quiet_libraries(None)  # no library progress bars or logs between the table's lines
    if args.features:
        shape = tuple(int(x) for x in args.features.lower().split("x"))
        table = compressors_only([m for m in args.methods if m != "none"], args.retentions, shape,
                                 args.repeats)
        print(f"compressor time at {args.features} | CPU ({torch.get_num_threads()} threads) | "
              f"median of {args.repeats}\n")
        print(table.to_markdown(index=False, floatfmt=".3g"))
        return 0
    adapter, name = load_model(args.overrides, args.model, args.dtype, args.device)
    if args.video_dir is None:
        from harness.data.synthetic import generate

        args.video_dir = generate(Path(os.environ.get("VTC_CACHE", ".cache")) / "data" / "vtc_synthetic").parent / "videos"
    videos = sorted(args.video_dir.glob("*.mp4"))[: args.videos]
    pixels = [adapter.load_video(str(v), args.frames) for v in videos]
    text = adapter.text_tokens(adapter.prompt_ids(QUESTION)[0], pixels[0])  # (+ Qwen3-VL's timestamps)
    rows = []
    for spec in args.methods:
        has_knobs = ":" in spec or "+" in spec
        targets = [None] if has_knobs or args.retentions is None or spec == "none" else args.retentions
        for retention in targets:
            try:
                compressor, label = build(spec, retention, lambda needs: [adapter.encode(px, needs).visual for px in pixels],
                                          adapter.video_tokens(str(videos[0]), args.frames), text,
                                          adapter.llm_shape, getattr(adapter, "vision_shape", None))
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
