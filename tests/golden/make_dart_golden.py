"""Write tests/golden/dart_golden.pt: fixed layer K-1 keys and normed states and DART's selection.

    python tests/golden/make_dart_golden.py

The expected kept set comes from the literal reference (tests/reference/dart.py), not from
methods/dart.py: 6 head entries, 120 video tokens drawn around 6 centroids (duplicates that the
pivots' picks must skip), 14 text entries; 4 + 4 pivots, keep 0.3. Inputs stored as float16
(exact in float32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference.dart import reference_select

HEAD, VIDEO, TEXT, KEEP, PIVOTS = 6, 120, 14, 0.3, (4, 4)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n = HEAD + VIDEO + TEXT
    keys = torch.randn(n, 32, generator=g).half()
    centroids = torch.randn(6, 24, generator=g)
    normed = (centroids[torch.randint(0, 6, (n,), generator=g)] + 0.3 * torch.randn(n, 24, generator=g)).half()
    ref = reference_select(keys.float(), normed.float(), range(HEAD, HEAD + VIDEO), list(range(HEAD + VIDEO, n)),
                           *PIVOTS, KEEP)
    assert ref.margin > 1e-4, ref.margin  # float32 round-off cannot flip a decision
    out = Path(__file__).with_name("dart_golden.pt")
    torch.save({"keys": keys, "normed": normed, "head": HEAD, "video": VIDEO, "keep": KEEP, "pivots": PIVOTS,
                "kept": torch.tensor(ref.kept)}, out)
    print(f"wrote {out}: keeps {len(ref.kept)} of {VIDEO}, margin {ref.margin:.2e}")


if __name__ == "__main__":
    main()
