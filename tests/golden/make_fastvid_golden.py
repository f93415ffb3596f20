"""Write tests/golden/fastvid_golden.pt: a fixed video-like input and its FastVID output.

    python tests/golden/make_fastvid_golden.py

The expected output comes from the literal float64 implementation (tests/reference/fastvid.py),
not from methods/fastvid.py, so the golden test checks the spec and the official code's choices
as well as regressions. The input has scenes of several lengths, so the output holds salient
tokens, single-frame anchors and multi-frame segments with two anchor frames; the density noise
is drawn from seed NOISE_SEED as the implementation draws it. Inputs are stored as float16
(exact in float32) to keep the file small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.fastvid import reference_fastvid

FRAMES, PER_FRAME, DIM = 9, 49, 16
KNOBS = dict(retention=0.3, segments=3, seg_tau=0.5, context_share=0.4, anchor_every=2,
             merge_floor=0.6)
NOISE_SEED = 0
SCENES = [0, 0, 0, 0, 0, 1, 2, 2, 2]  # segments of 5 (three anchor frames), 1 and 3 (two)


def main() -> None:
    torch.manual_seed(0)
    prototypes = torch.randn(3, DIM)
    global_features = (prototypes[SCENES] + 0.1 * torch.randn(FRAMES, DIM)).half()
    centroids = torch.randn(12, DIM)
    x = (centroids[torch.randint(0, 12, (FRAMES, PER_FRAME))]
         + 0.5 * torch.randn(FRAMES, PER_FRAME, DIM)).half()
    saliency = torch.rand(FRAMES, PER_FRAME).half()
    ref = reference_fastvid(x.float(), saliency.float(), global_features.float(), **KNOBS,
                            noise_seed=NOISE_SEED)
    # float32 round-off must not be able to flip a decision of this input.
    assert ref.margin > 1e-4, ref.margin
    assert [length for _, length in ref.segments] == [5, 1, 3], ref.segments
    out = Path(__file__).with_name("fastvid_golden.pt")
    torch.save({"features": x, "saliency": saliency, "global_features": global_features,
                "knobs": KNOBS, "noise_seed": NOISE_SEED, "expected": ref.tokens.float(),
                "positions": torch.tensor(ref.positions)}, out)
    print(f"wrote {out}: {FRAMES}x{PER_FRAME}x{DIM} -> {tuple(ref.tokens.shape)}, segments "
          f"{ref.segments}, margin {ref.margin:.2e}")


if __name__ == "__main__":
    main()
