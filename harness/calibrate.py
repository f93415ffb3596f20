"""Retention targeting: find the knob value whose mean achieved rho_tok hits a target.

For a visual-stage method whose retention follows from a knob (Scissor's tau), bisect that knob on a
fixed calibration subset of the task (the first `task.calibration_size` documents) until the mean
token retention is within `TOLERANCE` of the target. Only the vision side runs: the LLM does not
influence how many tokens a visual-stage compressor keeps. Results are cached per
(model, task, frames, method, fixed knobs, target) under cache_dir/calibration/.

FastV (`retention_via == "keep"`) is not bisected: its retention is a prefill FLOPs ratio, a closed
form in the token counts, so `keep` is solved from the calibration prompts' mean text length.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

import methods
from harness.errors import ConfigError
from harness.rundir import write_json
from harness.feature_cache import encode_file
from harness.video import VideoError

TOLERANCE = 0.01  # +-1 percentage point of token retention
log = logging.getLogger(__name__)


def calibration_size(cfg) -> int:
    """The first `task.calibration_size` documents, or all evaluated ones when `task.limit` is
    smaller (then the calibration set is exactly what the run evaluates)."""
    size = cfg.task.calibration_size
    return min(size, cfg.task.limit) if cfg.task.limit else size


def calibration_features(adapter, tasks: dict, size: int, frames: int, cache=None):
    """Pooled features of the first `size` videos of the task (videos that fail are skipped)."""
    features = []
    for task in tasks.values():
        for doc in task.eval_docs:
            if len(features) == size:
                return features
            try:
                encoded = encode_file(adapter, task.doc_to_visual(doc)[0], frames, False, cache)
            except VideoError as err:
                log.warning("calibration skips a video: %s", err)
                continue
            features.append(encoded.visual)
    if not features:
        raise ConfigError("retention targeting found no readable video in the task to calibrate on")
    return features


def mean_retention(name: str, knobs: dict, features, seed: int) -> float:
    compressor = methods.build(name, **knobs)
    compressor.seed = seed
    with torch.inference_mode():
        kept = [compressor.compress(x).shape[0] / (x.features.shape[0] * x.features.shape[1])
                for x in features]
    return sum(kept) / len(kept)


def bisect_knob(measure, low: float, high: float, target: float, steps: int = 40):
    """Bisection for a knob whose retention grows with its value; returns (value, achieved, trace)."""
    trace = []
    r_low, r_high = measure(low), measure(high)
    trace += [(low, r_low), (high, r_high)]
    if not r_low - TOLERANCE <= target <= r_high + TOLERANCE:
        raise ConfigError(f"retention={target}: unreachable on this task; the method reaches "
                          f"{100 * r_low:.2f}%-{100 * r_high:.2f}% over its knob range [{low}, {high}]")
    best = min(trace, key=lambda t: abs(t[1] - target))
    for _ in range(steps):
        if abs(best[1] - target) <= TOLERANCE / 4:  # well inside the +-1 point window
            break
        mid = (low + high) / 2
        r_mid = measure(mid)
        trace.append((mid, r_mid))
        best = min(best, (mid, r_mid), key=lambda t: abs(t[1] - target))
        low, high = (mid, high) if r_mid < target else (low, mid)
    if abs(best[1] - target) > TOLERANCE:
        raise ConfigError(f"retention={target}: the closest achievable mean retention is "
                          f"{100 * best[1]:.2f}% (knob={best[0]:.6f}); retention jumps past the "
                          f"+-{100 * TOLERANCE:.0f} point window on this task")
    return best[0], best[1], trace


def calibration_text_tokens(adapter, tasks: dict, size: int) -> list[int]:
    """Prompt lengths (text tokens, the video placeholder counted as the newline) of the first
    `size` documents of the task."""
    lengths = []
    for task in tasks.values():
        for doc in task.eval_docs:
            if len(lengths) == size:
                return lengths
            lengths.append(len(adapter.prompt_ids(task.doc_to_text(doc))[0]))
    if not lengths:
        raise ConfigError("retention targeting found no document in the task to calibrate on")
    return lengths


def flops_matched_keep(cfg, choice, adapter, tasks: dict) -> dict:
    """FastV: the `keep` whose prefill FLOPs ratio equals the target retention, solved from the
    calibration prompts' mean text length and F*N video tokens (no model run, no bisection)."""
    from harness.retention import retention_numbers
    from methods.fastv import keep_for_flops_ratio

    cls = methods.REGISTRY[choice.name]
    K = choice.knobs.get("K", cls.K)
    text_cfg = adapter.config.text_config
    d, m, layers = text_cfg.hidden_size, text_cfg.intermediate_size, text_cfg.num_hidden_layers
    video = cfg.model.frames * adapter.tokens_per_frame
    lengths = calibration_text_tokens(adapter, tasks, calibration_size(cfg))
    text = sum(lengths) / len(lengths)
    try:
        keep = keep_for_flops_ratio(choice.target_retention, K, layers, text, video, d, m)
    except ValueError as err:
        raise ConfigError(f"retention={choice.target_retention} ({choice.name} maps retention to "
                          f"keep by prefill FLOPs): {err}") from err
    kept = max(1, round(keep * video))  # what the method will keep, rounded as it rounds
    achieved = [retention_numbers(video, t, [video] * K + [kept] * (layers - K), d, m)["rho_flops"]
                for t in lengths]
    achieved = sum(achieved) / len(achieved)
    print(f"calibrated {choice.name} keep={keep:.6f} for retention {choice.target_retention:g} by "
          f"FLOPs matching (K={K}, {text:.1f} text + {video} video tokens; rho_flops "
          f"{100 * achieved:.2f}% on {len(lengths)} calibration prompts)")
    return {"knobs": {"keep": keep}, "achieved_on_calibration": achieved, "measure": "rho_flops",
            "key": {"model": cfg.model.path, "task": cfg.task.lmms_task, "frames": cfg.model.frames,
                    "size": calibration_size(cfg), "method": choice.name, "K": K,
                    "target": choice.target_retention},
            "samples": len(lengths), "text_tokens": text}


def calibrate(cfg, choice, adapter, tasks: dict, cache_dir: Path, feature_cache=None) -> dict:
    cls = methods.REGISTRY[choice.name]
    if getattr(cls, "retention_via", None) == "keep":  # FastV: analytic, from token counts
        return flops_matched_keep(cfg, choice, adapter, tasks)
    knob = cls.retention_via
    low, high = cls.retention_range
    fixed = {k: v for k, v in choice.knobs.items() if k != knob}
    key = {"model": cfg.model.path, "weights": adapter.fingerprint, "task": cfg.task.lmms_task,
           "frames": cfg.model.frames,
           "size": calibration_size(cfg), "method": choice.name, "fixed": fixed,
           "target": choice.target_retention, "seed": cfg.seed}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir / "calibration" / f"{choice.name}-{digest}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        log.info("calibration cache hit %s: %s", path, cached["knobs"])
        return cached
    features = calibration_features(adapter, tasks, calibration_size(cfg), cfg.model.frames, feature_cache)
    value, achieved, trace = bisect_knob(
        lambda v: mean_retention(choice.name, {**fixed, knob: v}, features, cfg.seed),
        low, high, choice.target_retention)
    result = {"knobs": {knob: value}, "achieved_on_calibration": achieved, "key": key,
              "samples": len(features), "trace": trace}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"calibrated {choice.name} {knob}={value:.6f} for retention {choice.target_retention:g} "
          f"(achieved {100 * achieved:.2f}% on {len(features)} calibration videos; cached in {path})")
    return result
