"""Feature cache: a 4-point tau sweep on the embedded task vs 4 independent runs.

    python benchmarks/bench_feature_cache.py [--limit 24] [--frames 8] [--taus 0.95 0.9 0.85 0.8]

Both arms run the same four Scissor configurations through the full harness (model load, lmms_eval,
scoring). The independent arm has the feature cache off, so each run encodes every video; the sweep
arm starts from an empty cache, so only its first point runs the vision encoder. Prints wall times
and their ratio, measured in one process, one arm after the other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.helpers

import harness.run.config  # noqa: F401
from tests.helpers import run_config

CONF = Path(__file__).resolve().parent.parent / "conf"


def arm(taus, limit, frames, cache_features: bool, root: Path, shared_cache: Path) -> tuple[float, list]:
    times = []
    for tau in taus:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "+method=scissor", f"tau={tau}", f"task.limit={limit}", f"model.frames={frames}",
                f"results_dir={root / 'results'}", f"cache_dir={shared_cache}", "progress=false",
                f"feature_cache={str(cache_features).lower()}", f"run_id=tau{tau}"])
        start = time.perf_counter()
        run_config(cfg)
        times.append(time.perf_counter() - start)
    return sum(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.95, 0.9, 0.85, 0.8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"  # model and videos shared; features only written by the sweep arm
        independent, ind_times = arm(args.taus, args.limit, args.frames, False, tmp / "ind", cache)
        sweep, sweep_times = arm(args.taus, args.limit, args.frames, True, tmp / "sweep", cache)
    print(f"{len(args.taus)}-point tau sweep, {args.limit} samples, {args.frames} frames, tiny model, CPU")
    print(f"independent runs (no feature cache): {independent:7.2f} s  per run: "
          + ", ".join(f"{t:.2f}" for t in ind_times))
    print(f"sweep with feature cache:            {sweep:7.2f} s  per run: "
          + ", ".join(f"{t:.2f}" for t in sweep_times))
    print(f"speed-up: {independent / sweep:.2f}x")


if __name__ == "__main__":
    main()
