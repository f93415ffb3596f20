"""Time ToMe inside a SigLIP-so400m-shaped encoder against its dense floor, and the merge step alone.

    python benchmarks/bench_tome.py            # 26 layers, 2 frames, retention 0.25 and 0.5 (CPU: minutes)
    python benchmarks/bench_tome.py --quick    # 4 layers, 1 frame
    python benchmarks/bench_tome.py --device cuda --frames 32

encoder: a randomly initialised SigLIP vision model of LLaVA-OneVision's widths (1152 wide, 16 heads,
FFN 4304, 27x27 patches) through
  stock  transformers' SiglipVisionModel, every layer on all 729 patches (what `none` runs);
  ours   harness.models.llava_onevision.run_encoder with ToMe's policy (methods/tome.py): matching,
         size-weighted merges, the log(size) attention bias;
  floor  the same loop and layers on the planned token counts with no matching, no merging and no
         bias (each layer's tokens simply cut to the plan): the dense work of the merged encoder,
         which no ToMe implementation can go below.
merge: ToMe's own step over the planned layers (bipartite_soft_matching, merge_wavg, the origin) on
F frames of keys (head_dim 72) and states (1152), against its floor: the (t/2) x (t/2) similarity
products of the same sizes (every A-token's best B needs all of them) and one copy of the states
(every state is read and every output row written once). The official merge_wavg makes several
passes over the states (x*size, two gathers, the scatter, the concatenation, the division), kept as
they are: the equality with the official code is exact, and in the encoder the step is ~1 % of a
layer's time (the encoder's ours/floor above).
Ratios are of times measured in the same run: ours/floor (ToMe's overhead over the merged encoder's
dense work), stock/ours (the encoder's speedup), and the analytic FLOPs ratio stock/ours.
CPU timings: the minimum over interleaved repetitions after a warm-up; on CUDA, synchronised.
OMP_WAIT_POLICY=PASSIVE unless set (see benchmarks/bench_divprune.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.models.llava_onevision import run_encoder  # noqa: E402
from methods.core.base import EncoderPolicy  # noqa: E402
from methods.core.flops import VisionShape, encoder_flops  # noqa: E402
from methods.tome import ToMe, bipartite_soft_matching, merge_wavg  # noqa: E402


class Truncate(EncoderPolicy):
    """The floor: each layer's MLP sees the planned count of tokens, cut, with no matching or bias."""

    def __init__(self, layer_tokens):
        self.layer_tokens = layer_tokens

    def start(self, hidden):
        pass

    def attention_bias(self, dtype):
        return None

    def act(self, layer, hidden, metric):
        return hidden[:, :self.layer_tokens[layer][1]]

    def finish(self, hidden):
        return hidden, torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)


def siglip(layers: int, device: torch.device, dtype: torch.dtype):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers,
                                num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return SiglipVisionModel(config).to(device, dtype).eval(), config


def best_of(fns: dict, repeats: int, device: torch.device) -> dict:
    """{name: best ms} over interleaved repetitions after one warm-up of each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
    sync()
    best = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 1 frame, fewer repetitions")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default 26; quick 4)")
    parser.add_argument("--frames", type=int, default=None, help="frames (default 2; quick 1)")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = args.layers or (4 if args.quick else 26)
    frames = args.frames or (1 if args.quick else 2)
    repeats = 2 if args.quick else 3
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"load average {os.getloadavg()[0]:.2f}")
    model, config = siglip(layers, device, dtype)
    vision = VisionShape(patches=729, layers=layers, hidden=1152, ffn=4304, heads=16, tokens=196)
    pixels = torch.randn(frames, 3, 384, 384, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    from transformers.models.siglip.modeling_siglip import eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention_forward)
    dense_flops = encoder_flops(config, frames)
    print(f"encoder: {layers} layers x {frames} frames; times in ms (best of {repeats})")
    header = (f"{'r':>5} {'k':>4} {'stock':>9} {'ours':>9} {'floor':>9} {'ours/floor':>10} {'stock/ours':>10} "
              f"{'FLOPs stock/ours':>16}")
    print(header + "\n" + "-" * len(header))
    worst = 0.0
    with torch.inference_mode():
        for retention in args.retentions:
            tome = ToMe(retention=retention)
            planned = tome.encoder_policy(vision).layer_tokens
            t = best_of({
                "stock": lambda: model(pixels).last_hidden_state,
                "ours": lambda: run_encoder(model, pixels, tome.encoder_policy(vision), layers, attention),
                "floor": lambda: run_encoder(model, pixels, Truncate(planned), layers, attention),
            }, repeats, device)
            worst = max(worst, t["ours"] / t["floor"])
            flops = encoder_flops(config, frames, layer_tokens=planned)
            print(f"{retention:5.2f} {planned[-1][1]:4d} {t['stock']:9.1f} {t['ours']:9.1f} {t['floor']:9.1f} "
                  f"{t['ours'] / t['floor']:10.2f} {t['stock'] / t['ours']:10.2f} {dense_flops / flops:16.2f}",
                  flush=True)

        # the merge step alone, at LLaVA-OneVision's 26-layer plan, on F frames
        merge_frames = 32 if device.type == "cuda" else 8
        print(f"\nmerge step alone: 26 layers' plan, {merge_frames} frames, keys 72, states 1152")
        g = torch.Generator().manual_seed(1)
        for retention in args.retentions:
            policy = ToMe(retention=retention).encoder_policy(VisionShape(729, 26, 1152, 4304, 16, 196))
            inputs = [(torch.randn(merge_frames, a, 72, generator=g).to(device, dtype),
                       torch.randn(merge_frames, a, 1152, generator=g).to(device, dtype), r)
                      for (a, _), r in zip(policy.layer_tokens, policy.merges)]

            def ours():
                size = None
                for metric, x, r in inputs:
                    merge = bipartite_soft_matching(metric, r)
                    merge(torch.zeros(merge_frames, x.shape[1], 1, dtype=torch.long, device=device), mode="amin")
                    size = merge_wavg(merge, x, size if size is not None and size.shape[1] == x.shape[1] else None)[1]

            def floor():
                for metric, x, _ in inputs:
                    m = metric.float()
                    m[..., ::2, :] @ m[..., 1::2, :].transpose(-1, -2)
                    x.clone()

            t = best_of({"ours": ours, "floor": floor}, repeats, device)
            print(f"r={retention:.2f}: ours {t['ours']:.1f} ms, floor {t['floor']:.1f} ms, "
                  f"ours/floor {t['ours'] / t['floor']:.2f}", flush=True)
    print(f"worst encoder ours/floor {worst:.2f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
