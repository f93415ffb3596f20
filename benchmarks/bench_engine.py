"""Evaluation engine vs the naive loop: samples/s, prefill per question, and identical predictions.

    python benchmarks/bench_engine.py [--limit 40] [--model micro|0.5b] [--methods none uniform ...]
    python benchmarks/bench_engine.py --task nextqa --clips 3 --per-clip 8 --model 0.5b --methods none uniform

Each method runs twice through the full harness on the embedded task (every clip asked 4
questions, so a video's prefix is shared by 4 of them) or on a NExT-QA fixture in lmms_eval's
NExT-QA format (`--per-clip` questions per video: NExT-QA asks about 8.5), one arm after the other in one process,
with the feature cache off (each run encodes its videos): `engine=default` (requests grouped by
video, videos read ahead, the [head + video] prefix prefilled once per video where the method
allows) and `engine=naive` (one request at a time, every prompt prefilled whole, each video read
when its request comes). Prints, per method and arm, the request loop's samples/s (summary.json
`throughput`), prefill seconds per question, the share of the loop spent reading videos and whether
it overlapped the model; then the speed-up and whether every prediction is the same.
`--model 0.5b` runs the LLaVA-OneVision-0.5B architecture with random weights at 4 frames (real
prefill lengths: 4 x 196 video tokens), where prefill dominates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.helpers

import harness.run.config  # noqa: F401  (registers the schemas)
from tests.helpers import run_config

CONF = Path(__file__).resolve().parent.parent / "conf"
METHODS = {"none": [], "uniform": ["+method=uniform", "retention=0.25"],
           "scissor": ["+method=scissor", "retention=0.25"], "dycoke": ["+method=dycoke"],
           "fastv": ["+method=fastv", "retention=0.6"]}
MODELS = {"micro": [], "0.5b": ["model=llava_ov_0.5b", "model.random_init=true", "model.frames=4"]}


def run(method: str, engine: str, limit: int, model: str, root: Path, task: list[str]) -> tuple[dict, list]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *MODELS[model], *task, *METHODS[method], f"engine={engine}", f"task.limit={limit}",
            "feature_cache=false", "progress=false", f"results_dir={root / 'results'}",
            f"cache_dir={root / 'cache'}", f"run_id={method}-{engine}"])
    run_dir = run_config(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return summary, sorted((r["doc_id"], r["prediction"]) for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=40, help="questions (4 per clip)")
    parser.add_argument("--model", choices=sorted(MODELS), default="micro")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--task", choices=["synthetic", "nextqa"], default="synthetic")
    parser.add_argument("--clips", type=int, default=3, help="--task nextqa: videos")
    parser.add_argument("--per-clip", type=int, default=8, help="--task nextqa: questions per video")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        task, what = ["task=synthetic"], f"{args.limit} questions (4 per clip) of the synthetic task"
        if args.task == "nextqa":
            from tests.helpers.benchmarks import write_benchmark

            fixture = write_benchmark("nextqa", root / "nextqa", clips=args.clips, per_clip=args.per_clip)
            task, what = ["task=nextqa", *fixture["overrides"]], \
                f"a NExT-QA fixture of {args.clips} videos x {args.per_clip} questions"
            args.limit = args.clips * args.per_clip
        print(f"engine vs naive: {what}, model {args.model}, feature cache off, CPU")
        print(f"{'method':8s} {'arm':8s} {'samples/s':>9s} {'prefill s/q':>11s} {'reading':>8s}  overlapped")
        run("none", "naive", 4, args.model, root / "warmup", task)  # data, model and imports ready before timing
        for method in args.methods:
            arms = {}
            for engine in ("default", "naive"):
                summary, predictions = run(method, engine, args.limit, args.model, root, task)
                t = summary["throughput"]
                prefill = t["shares"]["prefill"] * t["wall_s"] / t["samples"]
                arms[engine] = (t["samples_per_s"], predictions)
                print(f"{method:8s} {engine:8s} {t['samples_per_s']:9.2f} {prefill:11.4f} "
                      f"{100 * t['shares']['video_reading']:7.1f}%  {t['video_reading_overlapped']}")
            same = arms["default"][1] == arms["naive"][1]
            print(f"{method:8s} speed-up {arms['default'][0] / arms['naive'][0]:.2f}x, "
                  f"predictions {'identical' if same else 'DIFFER'} ({len(arms['default'][1])} samples)")


if __name__ == "__main__":
    main()
