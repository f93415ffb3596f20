"""Write tests/golden/sparsevlm_golden.pt: fixed scores and states of one stage and SparseVLM's output.

    python tests/golden/make_sparsevlm_golden.py

The expected tokens come from the literal reference (tests/reference/sparsevlm.py), not from
methods/sparsevlm.py: 300 video tokens around 5 centroids, k = 90 kept, 63 recycled into 7 clusters
by DPC-kNN with the seeded 1e-6 noise (seed 0, one (1, 63) float32 draw). Inputs stored as float16
(exact in float32); the scores as float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.sparsevlm import reference_stage

COUNT, K, DIM, SEED = 300, 90, 16, 0


def main() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(COUNT, generator=g)
    states = (torch.randn(5, DIM, generator=g)[torch.randint(0, 5, (COUNT,), generator=g)]
              + 0.5 * torch.randn(COUNT, DIM, generator=g)).half()
    recycled = int((COUNT - K) * 0.3) + 1
    noise = torch.rand((1, recycled), generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)[0] * 1e-6
    ref = reference_stage(scores.tolist(), states.float(), K, noise)
    assert ref.margin > 1e-4 and ref.density_gap > 2e-7, (ref.margin, ref.density_gap)
    out = Path(__file__).with_name("sparsevlm_golden.pt")
    torch.save({"scores": scores, "states": states, "k": K, "seed": SEED, "entries": torch.tensor(ref.entries),
                "tokens": ref.states.float()}, out)
    print(f"wrote {out}: {len(ref.entries)} tokens ({ref.kept} kept), margin {ref.margin:.2e}, "
          f"density gap {ref.density_gap:.2e}")


if __name__ == "__main__":
    main()
