"""Retention targeting: set the knob a method declares so that a requested retention is reached.

A method's `retention_knob` (methods/core/base.py) says how `retention=r` reaches it. A direct knob takes
r itself. Any other knob is bisected on a fixed calibration subset of the task (the first
`task.calibration_size` documents) until the mean of the knob's measure is within `TOLERANCE` of r:
- rho_tok: the visual stage runs on the calibration videos' features (the LLM does not influence
  how many tokens a visual stage keeps);
- rho_flops: prefill FLOPs (methods/core/flops.py) from the calibration prompts' text lengths, the
  visual stage's token counts, and the per-layer counts the prefill policy plans (FLOPs matching).
The same search serves stacks (a pipeline's last tunable part, measured on the whole stack). No
model forward runs. Results are cached per (model, task, frames, method and fixed knobs, target)
under cache_dir/calibration/.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from harness.data.feature_cache import encode_file
from harness.data.identity import documents_identity
from harness.data.video import VideoError
from harness.errors import ConfigError
from harness.files import digest, write_json
from methods.core.base import Compressor, VideoTokens, VisualInput
from methods.core.flops import LLMShape, retention_numbers

TOLERANCE = 0.01  # +-1 percentage point of the measure
log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """What the measures need from the first documents of the task."""

    text_tokens: list[int]  # prompt tokens other than video tokens, per document
    full_video: list[int]  # F*N video tokens, per document (Qwen2.5-VL: N depends on the video)
    visual: list[VisualInput] | None = None  # pooled features, when a visual stage must run
    # for a prefill policy whose counts depend on the hidden states where it acts (STTM): per
    # document, the video tokens' states entering that layer (head + video prefilled once) and the grid
    states: list[tuple[torch.Tensor, tuple[int, int]]] | None = None


def calibration_size(size: int, limit: int | None) -> int:
    """The first `task.calibration_size` documents, or all evaluated ones when `task.limit` is
    smaller (then the calibration set is exactly what the run evaluates)."""
    return min(size, limit) if limit else size


def _documents(tasks: dict, size: int):
    """The first `size` documents, taken in turn from each task (a group's tasks, e.g. MVBench's 20,
    all calibrate it, not the first one alone): first documents first, so that every one is
    evaluated when `task.limit` (applied per task) is smaller than `size`."""
    queues = [(task, iter(task.eval_docs)) for task in tasks.values()]
    count = 0
    while queues and count < size:
        for entry in list(queues):
            doc = next(entry[1], None)
            if doc is None:
                queues.remove(entry)
                continue
            if count == size:
                return
            count += 1
            yield entry[0], doc


def calibration_set(adapter, tasks: dict, size: int, frames: int, need_visual: bool,
                    needs: frozenset, cache=None) -> CalibrationSet:
    """Text lengths (and, if asked, pooled features) of the first `size` documents of the task;
    documents whose video fails are skipped."""
    texts, full, visual = [], [], []
    for task, doc in _documents(tasks, size):
        path = task.doc_to_visual(doc)[0]
        try:  # the text besides the video tokens (a family's text between frames read from the file)
            text = adapter.text_tokens(adapter.prompt_ids(task.doc_to_text(doc))[0], (path, frames))
            if need_visual:
                encoded = encode_file(adapter, path, frames, needs, cache)
                question = (adapter.question_embeddings(task.doc_to_text(doc)) if "question" in needs else None)
                visual.append(replace(encoded.visual, question=question))
                full.append(encoded.visual.features.shape[0] * encoded.visual.features.shape[1])
            else:
                full.append(adapter.video_tokens(path, frames))
        except VideoError as err:
            log.warning("calibration skips a video: %s", err)
            continue
        texts.append(text)
    if not texts:
        raise ConfigError("retention targeting found no usable document in the task to calibrate on")
    return CalibrationSet(texts, full, visual if need_visual else None)


class _Captured(Exception):
    """Stops a calibration prefill once the states it is run for are taken."""


def layer_states(adapter, compressor: Compressor, tasks: dict, size: int, frames: int, cache=None) -> list:
    """Per calibration document, the video tokens' hidden states entering the layer where the
    compressor's prefill policy acts, and the frame grid: the prompt's head and video prefilled up to
    that layer (the question plays no part in a policy that plans from them)."""
    from methods.core import decoder

    policy = compressor.prefill_policy(adapter.llm_shape)
    (layer,) = policy.layers

    class Capture:
        layers = (layer,)

        def act(self, view):
            raise _Captured(view.hidden[0, view.video].detach())

    out = []
    for task, doc in _documents(tasks, size):
        try:
            encoded = encode_file(adapter, task.doc_to_visual(doc)[0], frames, compressor.needs, cache)
        except VideoError as err:
            log.warning("calibration skips a video: %s", err)
            continue
        compressed = adapter.compress(encoded, compressor, task.doc_to_text(doc))
        prompt = adapter.prompt(compressed, adapter.prompt_ids(task.doc_to_text(doc))[0])
        length = adapter.prefix_length(prompt)
        try:
            decoder.prefill(adapter.llm, prompt.embeds[:, :length], prompt.positions[..., :length], prompt.span,
                            Capture(), use_cache=False, video_mask=prompt.video_mask, deepstack=prompt.deepstack)
        except _Captured as captured:
            out.append((captured.args[0], tuple(prompt.run.grid)))
    return out


def stack_retention(compressor: Compressor, video_tokens: int, full_video: int, text: int,
                    shape: LLMShape, groups: torch.Tensor | None = None, states=None) -> dict:
    """The retention numbers of one prompt whose visual stage left `video_tokens` tokens (with
    these group ids, if it gives them), with the per-layer counts its prefill policy plans (a
    policy that plans acts before layers only, so its attention and MLP counts are the same; one
    acting mid-layer plans nothing), from `states` (the video's states where it acts, and the grid)
    for a policy that plans from them (`planned_from_states`)."""
    layers = [video_tokens] * shape.layers
    if compressor.has("prefill"):
        policy = compressor.prefill_policy(shape)
        planned = (policy.planned_from_states(*states) if states is not None
                   else policy.planned(video_tokens, groups))
        if planned is None:
            raise ConfigError(f"retention targeting: {compressor.title}'s prefill keeps a data-dependent "
                              "number of tokens, so its knob cannot be matched without running the LLM; "
                              "set the knob directly")
        layers = planned
    return retention_numbers(full_video, text, layers, shape)


def mean_measure(compressor: Compressor, measure: str, data: CalibrationSet, shape: LLMShape) -> float:
    values = []
    with torch.inference_mode():
        for i, text in enumerate(data.text_tokens):
            video, groups = data.full_video[i], None
            if data.visual is not None:
                out = compressor.compress(data.visual[i])
                video = (out.tokens if isinstance(out, VideoTokens) else out).shape[0]
                groups = out.groups if isinstance(out, VideoTokens) else None
            states = data.states[i] if data.states is not None else None
            values.append(stack_retention(compressor, video, data.full_video[i], text, shape, groups,
                                          states)[measure])
    return sum(values) / len(values)


def bisect_knob(measure, low: float, high: float, target: float, increasing: bool = True,
                steps: int = 60, what: str = "the method", precision: float = TOLERANCE / 4):
    """Bisection for a knob whose retention moves monotonically with its value (up if
    `increasing`), until within `precision` of the target; returns (value, achieved, trace)."""
    trace = []
    r_low, r_high = measure(low), measure(high)
    trace += [[low, r_low], [high, r_high]]  # lists: the trace reads back from JSON the same
    lo_r, hi_r = min(r_low, r_high), max(r_low, r_high)
    if not lo_r - TOLERANCE <= target <= hi_r + TOLERANCE:
        raise ConfigError(f"retention={target}: unreachable on this task; {what} reaches "
                          f"{100 * lo_r:.2f}%-{100 * hi_r:.2f}% over its knob range [{low}, {high}]")
    best = min(trace, key=lambda t: abs(t[1] - target))
    for _ in range(steps):
        if abs(best[1] - target) <= precision:  # well inside the +-1 point window
            break
        mid = (low + high) / 2
        r_mid = measure(mid)
        trace.append([mid, r_mid])
        best = min(best, [mid, r_mid], key=lambda t: abs(t[1] - target))
        low, high = (mid, high) if (r_mid < target) == increasing else (low, mid)
    if abs(best[1] - target) > TOLERANCE:
        raise ConfigError(f"retention={target}: the closest achievable mean retention is "
                          f"{100 * best[1]:.2f}% (knob={best[0]:.6f}); retention jumps past the "
                          f"+-{100 * TOLERANCE:.0f} point window on this task")
    return best[0], best[1], trace


def search(compressor: Compressor, target: float, data: CalibrationSet, shape: LLMShape) -> dict:
    """The declared knob's value whose mean measure on `data` is `target` (no cache, no printing)."""
    spec = compressor.retention_knob

    def measure(value):
        try:
            return mean_measure(compressor.with_knob(spec.knob, value), spec.measure, data, shape)
        except ValueError as err:  # a knob value the method rejects (e.g. its range)
            raise ConfigError(str(err)) from err

    # analytic FLOPs are cheap to evaluate: match them much more closely than the window asks
    precision = 1e-5 if spec.measure == "rho_flops" else TOLERANCE / 4
    held = f", with {compressor.held_knobs()} held" if compressor.composite else ""
    low, high = compressor.knob_range(spec.knob)
    value, achieved, trace = bisect_knob(measure, low, high, target, spec.increasing,
                                         what=f"{compressor.title} ({spec.measure} over {spec.knob}{held})",
                                         precision=precision)
    return {"knobs": {spec.knob: value}, "achieved_on_calibration": achieved, "measure": spec.measure,
            "samples": len(data.text_tokens), "trace": trace}


def _cached(path: Path | None) -> dict | None:
    """A calibration result on disk, or None (missing, or unreadable: then it is computed anew)."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"note: {path} is unreadable (cut short?); calibrating again", file=sys.stderr)
        return None


def calibrate(compressor: Compressor, target: float, adapter, tasks: dict, *, frames: int, size: int,
              identity: dict, cache_dir: Path | None = None, feature_cache=None, data_dir: str | None = None) -> dict:
    """The knob value for `target` retention: {"knobs": {knob: value}, ...} (cached on disk).

    identity: what else fixes the answer (task, its overrides, seed), for the cache key. A cached
    result is used only for the same calibration documents (their text and their videos' content,
    harness.data.identity.documents_identity); for changed data it is computed anew, with a note.
    """
    spec = compressor.retention_knob
    shape = adapter.llm_shape
    if compressor.has("prefill"):
        try:
            compressor.prefill_policy(shape)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    key = {**identity, "weights": adapter.fingerprint, "frames": frames, "size": size,
           "method": compressor.name, "knobs": compressor.knobs(), "knob": spec.knob,
           "measure": spec.measure, "target": target}
    documents = documents_identity(tasks, size, data_dir)
    path = cache_dir / "calibration" / f"{compressor.name}-{digest(key)[:12]}.json" if cache_dir else None
    cached = _cached(path)
    if cached is not None and cached.get("documents") == documents:
        log.info("calibration cache hit %s: %s", path, cached["knobs"])
        return cached
    if cached is not None:
        print(f"note: the calibration documents changed since {path} was computed; calibrating again",
              file=sys.stderr)
    data = calibration_set(adapter, tasks, size, frames, compressor.has("visual"), compressor.needs,
                           feature_cache)
    if compressor.has("prefill") and hasattr(compressor.prefill_policy(shape), "planned_from_states"):
        data.states = layer_states(adapter, compressor, tasks, size, frames, feature_cache)
    result = search(compressor, target, data, shape)
    result.update(key=key, documents=documents)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    value, achieved = result["knobs"][spec.knob], result["achieved_on_calibration"]
    print(f"calibrated {compressor.title} {spec.knob}={value:.6f} for retention {target:g} "
          f"({spec.measure} {100 * achieved:.2f}% on {len(data.text_tokens)} calibration documents"
          + (f"; cached in {path})" if path else ")"))
    return result


def visual_share(compressor: Compressor, data: CalibrationSet) -> float:
    """Mean share of the video tokens the visual stage keeps on the calibration set (rho_visual)."""
    with torch.inference_mode():
        kept = [video_tokens_of(compressor.compress(v)) / full for v, full in zip(data.visual, data.full_video)]
    return sum(kept) / len(kept)


def video_tokens_of(out) -> int:
    return (out.tokens if isinstance(out, VideoTokens) else out).shape[0]


def check_reachable(compressor: Compressor, target: float, vision, calibration) -> None:
    """For a knob set directly from `retention=`: the same one-line "unreachable" error as a
    calibrated knob's when the target lies outside what the method can keep, naming the reachable
    range. An encoder stage is checked against its plan on `vision` (the model's VisionShape); a
    visual stage on rho_tok against what it keeps at its knob's lowest setting on `calibration()`
    (a CalibrationSet with features, built only then). Used by runs and by harness.bench."""
    spec = compressor.retention_knob
    if spec is None or not spec.direct or compressor.composite:
        return
    if compressor.has("encoder") and vision is not None:
        encoder_reachable(compressor, target, vision)
    elif compressor.has("visual") and spec.measure == "rho_tok":
        reachable(compressor, target, calibration())


def encoder_reachable(compressor: Compressor, target: float, vision) -> None:
    """An encoder-stage method's planned tokens per frame (its plan on the model's encoder, `vision`:
    methods.core.flops.VisionShape) against the target share of the model's own tokens per frame: the
    same "unreachable" error where the encoder's depth cannot merge down to it (a shallow encoder)."""
    spec = compressor.retention_knob

    def share(value: float) -> float:
        policy = compressor.with_knob(spec.knob, value).encoder_policy(vision)
        return (policy.layer_tokens[-1][1] if policy.merging else vision.tokens) / vision.tokens

    achieved = share(target)
    if abs(achieved - target) > TOLERANCE:
        low, _ = compressor.knob_range(spec.knob)
        raise ConfigError(f"retention={target}: unreachable on this model; {compressor.title} keeps "
                          f"{100 * achieved:.2f}% of the {vision.tokens} tokens per frame there and at least "
                          f"{100 * share(low):.2f}% ({vision.layers} encoder layers, each merging at most "
                          "half of its tokens)")


def reachable(compressor: Compressor, target: float, data: CalibrationSet) -> None:
    """ConfigError unless `target` is within TOLERANCE of what the visual stage can keep on `data`."""
    spec = compressor.retention_knob
    low, high = compressor.knob_range(spec.knob)
    floor = visual_share(compressor.with_knob(spec.knob, low), data)
    if target < floor - TOLERANCE:
        top = visual_share(compressor.with_knob(spec.knob, high), data)
        raise ConfigError(f"retention={target}: unreachable on this task; {compressor.title} reaches "
                          f"{100 * floor:.2f}%-{100 * top:.2f}% over its knob range [{low:g}, {high:g}] "
                          f"(its visual stage's share of the video tokens)")
