"""`python -m harness.gpu_check [--out DIR] [--dry-run]`: everything that needs a GPU, in one command.

For the first time a CUDA device is at hand, with minutes rather than hours of it (under 8 minutes on
one H100). The steps, each timed, each written to one report (DIR/gpu_check.md and .json, by default
results/gpu_check/<time>), each allowed to fail without stopping the others:

1. `cuda-tests`: the tests that only run on CUDA (`pytest -k test_cuda_`: each method's CUDA output
   against its literal reference or its CPU output, without host synchronisation);
2. `keep-everything`: in bfloat16 on CUDA, FastV keep=1, PyramidDrop lambda=1 and uniform r=1 give
   `none`'s logits (LLaVA-OneVision-0.5B's architecture, random weights, 4 frames), exactly or with
   the largest difference reported;
3. `host-syncs`: per method, the host synchronisations one answer makes, counted by
   `torch.cuda.set_sync_debug_mode` (a method should not force the GPU to wait on the CPU);
4. `bench-7b`: `harness.bench` at `model=llava_ov_7b model.random_init=true`, 32 frames, every method
   at 25 %: prefill and TTFT speedup over `none`, peak memory, the compressor's share of the prefill.

`--dry-run` lists the steps with their estimated seconds and runs nothing. `--device cpu --quick`
runs the same steps on the tiny smoke model at 2 frames (the report's shape, for tests).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

STEPS = {  # name: (estimated seconds on one H100, what it checks)
    "cuda-tests": (90, "the CUDA-only tests (pytest -k test_cuda_)"),
    "keep-everything": (60, "FastV keep=1, PyramidDrop lambda=1, uniform r=1 equal none in bfloat16 on CUDA"),
    "host-syncs": (90, "host synchronisations per method during one answer"),
    "bench-7b": (210, "harness.bench at LLaVA-OV-7B shapes, 32 frames, every method at 25 %"),
}
IDENTITY = [("fastv", {"keep": 1.0}), ("pdrop", {"lambda_": 1.0}), ("uniform", {"retention": 1.0})]
REPO = Path(__file__).resolve().parent.parent


def setting(quick: bool) -> dict:
    """The model and frames of steps 2-4 (the tiny smoke model at 2 frames with --quick)."""
    if quick:
        return {"model": ["model=tiny"], "bench": ["model=tiny"], "frames": 2, "dtype": "float32"}
    return {"model": ["model=llava_ov_0.5b", "model.random_init=true"],
            "bench": ["model=llava_ov_7b", "model.random_init=true"], "frames": 4, "dtype": "bfloat16"}


def load(overrides: list[str], device: str, dtype: str):
    from harness.bench import load_model

    return load_model(overrides, None, dtype, device)[0]


def sample_video(adapter, frames: int):
    from harness.data.synthetic import generate

    import os

    questions = generate(Path(os.environ.get("VTC_CACHE", REPO / ".cache")) / "data" / "vtc_synthetic")
    return adapter.load_video(str(questions.parent / "videos" / "clip_0000.mp4"), frames)


def cuda_tests(args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "test_cuda_", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"ok": proc.returncode in (0, 5), "summary": last,  # 5: nothing collected (no CUDA test)
            "failures": [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]}


def keep_everything(args) -> dict:
    import torch

    import methods

    where = setting(args.quick)
    adapter = load(where["model"], args.device, where["dtype"])
    pixels = sample_video(adapter, where["frames"])
    ids, _ = adapter.prompt_ids("What colour is the background?\nA. gray\nB. purple\nC. teal\nD. brown")
    reference = None
    rows = {}
    with torch.inference_mode():
        none = methods.build("none")
        reference = adapter.prefill(adapter.prepare(pixels, none, ids), none, use_cache=False).logits.float()
        for name, knobs in IDENTITY:
            method = methods.build(name, **knobs)
            logits = adapter.prefill(adapter.prepare(pixels, method, ids), method, use_cache=False).logits.float()
            rows[f"{name} {knobs}"] = {"equal": bool(torch.equal(logits, reference)),
                                       "max_abs_diff": float((logits - reference).abs().max())}
    return {"ok": all(r["equal"] for r in rows.values()), "dtype": where["dtype"], "methods": rows}


def host_syncs(args) -> dict:
    import torch

    from harness.bench import DEFAULT_METHODS, build

    where = setting(args.quick)
    adapter = load(where["model"], args.device, where["dtype"])
    pixels = sample_video(adapter, where["frames"])
    question = "Which way does the white square move?\nA. left\nB. right\nC. up\nD. down"
    encoded = {frozenset(): adapter.encode_video(pixels)}
    full = encoded[frozenset()].visual.features.shape[0] * encoded[frozenset()].visual.features.shape[1]
    text = adapter.text_tokens(adapter.prompt_ids(question)[0], pixels)
    counts = {}
    for spec in DEFAULT_METHODS:
        try:
            compressor, _ = build(spec, None if spec == "none" else 0.25,
                                  lambda needs: [adapter.encode_video(pixels, needs).visual], full, text,
                                  adapter.llm_shape)
        except (ValueError, TypeError) as err:
            counts[spec] = {"skipped": str(err).splitlines()[0]}
            continue
        needs = frozenset(compressor.needs)
        if needs not in encoded:
            encoded[needs] = adapter.encode_video(pixels, needs)
        adapter.generate(encoded[needs], question, compressor, max_new_tokens=4)  # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if adapter.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                adapter.generate(encoded[needs], question, compressor, max_new_tokens=4)
            finally:
                if adapter.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        counts[spec] = {"host_syncs": len(syncs), "first": syncs[:3]}
    return {"ok": True, "device": str(adapter.device), "methods": counts}


def bench_7b(args) -> dict:
    where = setting(args.quick)
    out = args.out / "bench"
    command = [sys.executable, "-m", "harness.bench", *where["bench"], "--frames", str(8 if not args.quick else 2),
               "--videos", "1", "--repeats", "2", "--retentions", "0.25", "--device", args.device, "--out", str(out)]
    if not args.quick:
        command[command.index("--frames") + 1] = "32"
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    result = {"ok": proc.returncode == 0, "command": " ".join(command[2:])}
    if proc.returncode == 0:
        import pandas as pd

        table = pd.read_csv(out / "bench.csv")
        columns = [c for c in ("setting", "rho_tok", "prefill speedup", "TTFT speedup", "peak MB", "memory ratio",
                               "compressor / saved prefill") if c in table.columns]
        result["table"] = table[columns].to_dict(orient="records")
        result["markdown"] = table[columns].to_markdown(index=False, floatfmt=".3g")
    else:
        result["error"] = proc.stderr[-2000:]
    return result


RUNNERS = {"cuda-tests": cuda_tests, "keep-everything": keep_everything, "host-syncs": host_syncs,
           "bench-7b": bench_7b}


def report_markdown(report: dict) -> str:
    lines = [f"# GPU check {report['started']}", "", f"device: {report['device']}; torch {report['torch']}", ""]
    for name, step in report["steps"].items():
        lines += [f"## {name}: {'ok' if step.get('ok') else 'FAILED'} ({step.get('seconds', 0):.0f} s)", ""]
        if "markdown" in step:
            lines += [step["markdown"], ""]
        shown = {k: v for k, v in step.items() if k not in ("markdown", "table", "ok", "seconds")}
        lines += ["```", json.dumps(shown, indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="report directory (default results/gpu_check/<time>)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their estimated seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the tiny smoke model (to test this command)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    args = parser.parse_args(argv)
    if args.dry_run:
        for name in args.steps:
            seconds, what = STEPS[name]
            print(f"{name:16s} ~{seconds:4d} s  {what}")
        print(f"{'total':16s} ~{sum(STEPS[n][0] for n in args.steps):4d} s on one H100")
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible (use --device cpu --quick to try the steps)",
              file=sys.stderr)
        return 2
    args.out = args.out or REPO / "results" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "steps": {}}
    for name in args.steps:
        started = time.perf_counter()
        try:
            step = RUNNERS[name](args)
        except Exception as err:  # noqa: BLE001  (a failing step is reported; the others still run)
            step = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        step["seconds"] = time.perf_counter() - started
        report["steps"][name] = step
        print(f"{name}: {'ok' if step.get('ok') else 'FAILED'} ({step['seconds']:.0f} s)", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "gpu_check.md").write_text(report_markdown(report))
    print(f"report: {args.out / 'gpu_check.md'}")
    return 0 if all(s.get("ok") for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
