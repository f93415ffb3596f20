"""Write tests/golden/sttm_golden.pt: fixed video states and STTM's merge of them.

    python tests/golden/make_sttm_golden.py

The expected outputs come from the literal float64 reference (tests/reference/sttm.py), not from
methods/sttm.py. Two cases: 4 frames of a 14x14 grid (OneVision) made of 4x4 blocks with some
blocks changing between frames, and 3 frames of an odd 9x6 grid (the odd-side pooling and its
quirk); inputs stored as float16 (exact in float32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.sttm import reference_sttm

DIM = 16
CASES = [  # (frames, h, w, tau_s, tau_t, root_level)
    (4, 14, 14, 0.8, 0.7, 1),
    (3, 9, 6, 0.6, 0.5, 1),
]


def make_video(g: torch.Generator, frames: int, h: int, w: int) -> torch.Tensor:
    blocks = torch.randn(frames, (h + 3) // 4, (w + 3) // 4, DIM, generator=g)
    video = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :h, :w].clone()
    changed = torch.rand(frames - 1, h, w, 1, generator=g) < 0.4
    video[1:] = video[:1] + torch.where(changed, 1.0, 0.1) * torch.randn(frames - 1, h, w, DIM, generator=g)
    return (video + 0.2 * torch.randn(frames, h, w, DIM, generator=g)).half()


def main() -> None:
    g = torch.Generator().manual_seed(0)
    cases = []
    for frames, h, w, tau_s, tau_t, root in CASES:
        video = make_video(g, frames, h, w)
        ref = reference_sttm(video.float(), tau_s, tau_t, root)
        assert ref.margin > 1e-4, ref.margin  # float32 round-off cannot flip a decision
        cases.append({"video": video, "grid": (h, w), "tau_s": tau_s, "tau_t": tau_t, "root_level": root,
                      "keys": torch.tensor(ref.keys), "states": ref.states.float()})
        print(f"{frames}x{h}x{w} -> {len(ref.keys)} tokens, margin {ref.margin:.2e}")
    out = Path(__file__).with_name("sttm_golden.pt")
    torch.save(cases, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
