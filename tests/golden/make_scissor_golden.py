"""Write tests/golden/scissor_golden.pt: a fixed clustered input and its Scissor output.

    python tests/golden/make_scissor_golden.py

The expected output comes from the literal float64 implementation (tests/reference/scissor.py),
not from methods/scissor.py, so the golden test checks the spec as well as regressions. The
input is stored as float16 (exact in float32) to keep the file a few KB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.scissor import reference_scissor

FRAMES, PER_FRAME, DIM, TAU, EPSILON = 4, 49, 16, 0.8, 0.05


def main() -> None:
    torch.manual_seed(0)
    centroids = torch.randn(16, DIM)
    pick = torch.randint(0, 16, (FRAMES, PER_FRAME))
    x = (centroids[pick] + 0.5 * torch.randn(FRAMES, PER_FRAME, DIM)).half()
    ref = reference_scissor(x.float(), TAU, EPSILON)
    # float32 round-off must not be able to flip a decision of this input.
    assert min(ref.margin, ref.gap) > 1e-4, (ref.margin, ref.gap)
    out = Path(__file__).with_name("scissor_golden.pt")
    torch.save({"features": x, "tau": TAU, "epsilon": EPSILON,
                "expected": ref.output.float()}, out)
    print(f"wrote {out}: {FRAMES}x{PER_FRAME}x{DIM} -> {tuple(ref.output.shape)}, "
          f"margin {ref.margin:.2e}, gap {ref.gap:.2e}")


if __name__ == "__main__":
    main()
