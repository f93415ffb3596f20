"""Write tests/golden/holitom_golden.pt: fixed inputs and HoliTom's outputs on them.

    python tests/golden/make_holitom_golden.py

The expected outputs come from the literal float64 reference (tests/reference/holitom.py), not
from methods/holitom.py, so the golden test checks the spec and the official loops as well as
regressions. Visual stage: 6 frames of a 5x5 grid with still and moving positions and a scene cut,
contextual (dominant_share 0.5) and static clustering on, seeded DPC noise. Inner merge: 40 states,
half kept by a fixed score. Inputs are stored as float16 (exact in float32) to keep the file small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.holitom import reference_inner_merge, reference_visual

FRAMES, N, DIM, SEED = 6, 25, 16, 0
KNOBS = {"retention": 0.3, "tau": 0.8, "beta": 0.6, "dominant_share": 0.5, "knn": 7}
VIDEO_TOKENS, KEEP = 40, 0.5


def make_video(g: torch.Generator) -> torch.Tensor:
    centroids = torch.randn(8, DIM, generator=g)
    base = centroids[torch.randint(0, 8, (N,), generator=g)] + 0.5 * torch.randn(N, DIM, generator=g)
    frames = []
    for f in range(FRAMES):
        if f == 3:  # a scene cut
            base = centroids[torch.randint(0, 8, (N,), generator=g)] + 0.5 * torch.randn(N, DIM, generator=g)
        moving = (torch.rand(N, generator=g) < 0.4)[:, None]
        step = torch.randn(N, DIM, generator=g)
        base = base + torch.where(moving, step, 0.05 * step)
        frames.append(base)
    return torch.stack(frames).half()


def main() -> None:
    g = torch.Generator().manual_seed(0)
    features = make_video(g)
    scores = torch.rand(FRAMES, N, generator=g).half()
    ref = reference_visual(features.float(), scores.float(), generator=torch.Generator().manual_seed(SEED),
                           **KNOBS)
    assert ref.margin > 1e-4, ref.margin  # float32 round-off cannot flip a decision
    hidden = (torch.randn(4, DIM, generator=g)[torch.randint(0, 4, (VIDEO_TOKENS,), generator=g)]
              + 0.3 * torch.randn(VIDEO_TOKENS, DIM, generator=g)).half()
    attention = torch.randperm(VIDEO_TOKENS, generator=g).float() / VIDEO_TOKENS  # distinct
    merge = reference_inner_merge(hidden.float(), attention, KEEP)
    assert merge.margin > 1e-4, merge.margin
    out = Path(__file__).with_name("holitom_golden.pt")
    torch.save({"features": features, "scores": scores.float(), "knobs": KNOBS, "seed": SEED,
                "windows": ref.windows, "slots": torch.tensor(ref.slots), "tokens": ref.tokens.float(),
                "hidden": hidden, "kept": torch.tensor(merge.kept), "merged": merge.states.float()}, out)
    print(f"wrote {out}: {FRAMES}x{N}x{DIM} -> {tuple(ref.tokens.shape)}, windows {ref.windows}, "
          f"r' {ref.retain:.4f}, margin {ref.margin:.2e}; inner merge {VIDEO_TOKENS} -> "
          f"{len(merge.kept)}, margin {merge.margin:.2e}")


if __name__ == "__main__":
    main()
