"""Write tests/golden/prunevid_golden.pt: a fixed video, PruneVid's visual-stage output and the
per-group LLM selection on fixed scores.

    python tests/golden/make_prunevid_golden.py

The expected values come from the literal float64 implementation (tests/reference/prunevid.py),
not from methods/prunevid.py, so the golden test checks the official algorithm as well as
regressions. The input is stored as float16 (exact in float32) to keep the file small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.prunevid import reference_keep, reference_prunevid

FRAMES, PER_FRAME, DIM, SEED = 12, 196, 16, 0
SEGMENT_RATIO, TAU, CLUSTER_RATIO, LLM_KEEP = 0.25, 0.8, 0.5, 0.4


def make_video() -> torch.Tensor:
    """Three scenes; in each, half the positions barely change and the rest are redrawn."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.empty(FRAMES, PER_FRAME, DIM)
    for a, b in ((0, 4), (4, 9), (9, 12)):
        offset = 2 * torch.randn(DIM, generator=g)
        base = torch.randn(PER_FRAME, DIM, generator=g)
        still = torch.rand(PER_FRAME, generator=g) < 0.5
        for t in range(a, b):
            jitter = base + 0.15 * torch.randn(PER_FRAME, DIM, generator=g)
            x[t] = offset + torch.where(still[:, None], jitter, torch.randn(PER_FRAME, DIM, generator=g))
    return x.half()


def main() -> None:
    x = make_video()
    ref = reference_prunevid(x.float(), SEGMENT_RATIO, TAU, CLUSTER_RATIO, torch.Generator().manual_seed(SEED))
    # float32 round-off must not be able to flip a decision of this input
    assert ref.margin > 1e-5, ref.margin
    tokens, positions, groups, order = ref.in_position_order()
    scores = torch.rand(len(positions), generator=torch.Generator().manual_seed(SEED + 1))
    official = [0.0] * len(positions)
    for harness_index, official_index in enumerate(order):
        official[official_index] = float(scores[harness_index])
    kept = sorted(order.index(k) for k in reference_keep(official, ref.static_sizes, ref.dynamic_sizes,
                                                         ref.window_sizes, LLM_KEEP))
    out = Path(__file__).with_name("prunevid_golden.pt")
    torch.save({"features": x, "segment_ratio": SEGMENT_RATIO, "tau": TAU, "cluster_ratio": CLUSTER_RATIO,
                "seed": SEED, "llm_keep": LLM_KEEP, "tokens": tokens.float(),
                "positions": torch.tensor(positions), "groups": torch.tensor(groups),
                "scores": scores, "kept": torch.tensor(kept)}, out)
    print(f"wrote {out}: {FRAMES}x{PER_FRAME}x{DIM} -> {tuple(tokens.shape)} in segments "
          f"{ref.window_sizes} (static {ref.static_sizes}), {len(kept)} kept in the LLM; "
          f"margin {ref.margin:.2e}")


if __name__ == "__main__":
    main()
