"""Write tests/golden/visionzip_golden.pt: fixed features, patch scores and keys, and their VisionZip output.

    python tests/golden/make_visionzip_golden.py

The expected output comes from the literal float64 implementation (tests/reference/visionzip.py),
not from methods/visionzip.py, so the golden test checks the spec as well as regressions. The
inputs are stored as float16 (exact in float32) to keep the file small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.visionzip import reference_visionzip

FRAMES, DIM, CHANNELS, RETENTION = 3, 8, 4, 0.1  # k = 20 per frame: 17 dominant + 3 contextual


def main() -> None:
    torch.manual_seed(0)
    features = torch.randn(FRAMES, 196, DIM).half()
    scores = torch.rand(FRAMES, 729).half()
    keys = torch.randn(FRAMES, 729, CHANNELS).half()
    ref = reference_visionzip(features.float(), scores.float(), keys.float(), (14, 14), RETENTION)
    # float32 round-off must not be able to flip a decision of this input.
    assert min(ref.score_margin, ref.cosine_margin) > 1e-5, (ref.score_margin, ref.cosine_margin)
    out = Path(__file__).with_name("visionzip_golden.pt")
    torch.save({"features": features, "patch_scores": scores, "patch_keys": keys, "retention": RETENTION,
                "expected": ref.output.float()}, out)
    print(f"wrote {out}: {FRAMES}x196x{DIM} -> {tuple(ref.output.shape)}, "
          f"margins {ref.score_margin:.2e} (scores), {ref.cosine_margin:.2e} (cosines)")


if __name__ == "__main__":
    main()
