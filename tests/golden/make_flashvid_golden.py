"""Write tests/golden/flashvid_golden.pt: a fixed video-like input and its FlashVID visual-stage output.

    python tests/golden/make_flashvid_golden.py

The expected output comes from the literal float64 implementation (tests/reference/flashvid.py),
not from methods/flashvid.py, so the golden test checks the official code's steps and this
harness's documented choices as well as regressions. The input has scenes of several lengths, so
the output holds ADTS tokens, one-frame segments (whole frames clustered) and multi-frame segments
with temporal trees and clustered roots; the DPC-kNN noise is drawn from seed NOISE_SEED as the
implementation draws it. Inputs are stored as float16 (exact in float32) to keep the file small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.flashvid import reference_flashvid

FRAMES, PER_FRAME, DIM = 9, 49, 16
KNOBS = {"retention": 0.4, "expansion": 1.25, "alpha": 0.5, "temporal_threshold": 0.7,
         "segment_threshold": 0.5, "min_segments": 3, "selection": "attn_div_v2"}
NOISE_SEED = 0
SEED = 7  # an input whose decisions are all far from flipping (margin > 1e-4)
SCENES = [0, 0, 0, 0, 1, 2, 2, 2, 2]  # segments of 4, 1 and 4 frames


def main() -> None:
    torch.manual_seed(SEED)
    centroids = torch.randn(12, DIM) + 0.5
    scenes = [centroids[torch.randint(0, 12, (PER_FRAME,))] + 0.5 * torch.randn(PER_FRAME, DIM)
              for _ in range(max(SCENES) + 1)]
    x = torch.stack([scenes[s] + 0.3 * torch.randn(PER_FRAME, DIM) for s in SCENES]).half()
    scores = torch.rand(FRAMES, PER_FRAME).softmax(-1).half()
    ref = reference_flashvid(x.float(), scores.float(), **KNOBS, noise_seed=NOISE_SEED)
    # float32 round-off must not be able to flip a decision of this input.
    assert ref.margin > 1e-4, ref.margin
    assert [e - s for s, e in ref.segments] == [4, 1, 4], ref.segments
    out = Path(__file__).with_name("flashvid_golden.pt")
    torch.save({"features": x, "scores": scores, "knobs": KNOBS, "noise_seed": NOISE_SEED,
                "expected": ref.tokens.float(), "positions": torch.tensor(ref.positions),
                "segments": ref.segments, "roots": ref.roots}, out)
    print(f"wrote {out}: {FRAMES}x{PER_FRAME}x{DIM} -> {tuple(ref.tokens.shape)}, segments "
          f"{ref.segments}, roots {ref.roots}, margin {ref.margin:.2e}")


if __name__ == "__main__":
    main()
