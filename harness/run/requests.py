"""The harness model as an lmms_eval model: a video LLM (any family of harness/models) + one compressor.

lmms_eval hands it every request of a task at once. It answers them grouped by video (harness/run/
engine.py): each video is read ahead in the background, encoded once and compressed once, and when
the compressor's work up to the end of the video does not read the question, the prompt's prefix
[head text + video tokens] is prefilled once and every question continues from its KV cache
(`engine.share_prefix`). Under data parallelism each rank answers whole videos. Each sample's
record (prediction, target, score, retention, timings) is written the moment it completes, and
samples already on disk are served from there, which is what makes a re-run resume. Results go
back to lmms_eval in its own order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

import methods
from harness.data.feature_cache import FeatureCache, encode_input, read_input
from harness.data.video import VideoError
from harness.lmms_compat import score_one
from harness.models.base import Compressed, VideoLLM, VideoPass
from harness.run import distributed
from harness.run.config import EngineConf
from harness.run.engine import Prefetcher, group_by_video, shard
from harness.run.rundir import RunDir, sample_key
from methods.core.base import Compressor
from methods.core.flops import retention_numbers

FAILURES = (VideoError, torch.OutOfMemoryError)  # one sample (or one video's samples) fails, the run goes on


class SampleError(RuntimeError):
    """A sample that cannot be run (bad document or media); recorded as failed, the run goes on."""


@dataclass(frozen=True)
class Unreadable:
    """A document whose visual could not be had: its requests fail alone, with this reason."""

    reason: str


@dataclass
class Clock:
    """Where the request loop's time went (seconds): the loop's wall time, the parts measured inside
    it, and the video reading done ahead in the background (overlapped with the rest)."""

    samples: int = 0
    wall: float = 0.0
    parts: dict = field(default_factory=lambda: dict.fromkeys(
        ("vision", "compressor", "prefill", "generation", "waiting"), 0.0))
    video_reading: float = 0.0  # in the background thread when prefetching, else inside the loop

    def add_run(self, timings: dict) -> None:
        """A sample's measured work (its vision time is the encoder's compute time, also for a video
        from the feature cache, so the loop times the encoding itself: `parts["vision"]`)."""
        self.samples += 1
        for part, key in (("compressor", "compressor"), ("prefill", "prefill"), ("generation", "decode")):
            self.parts[part] += timings.get(key, 0.0)

    def merge(self, other: "Clock") -> None:
        """Another rank's clock: samples add up, the wall time is the slowest rank's."""
        self.samples += other.samples
        self.wall = max(self.wall, other.wall)
        for part, value in other.parts.items():
            self.parts[part] += value
        self.video_reading += other.video_reading

    def report(self, prefetched: bool) -> dict | None:
        """summary.json's `throughput`: samples per second of the loop's wall time, and each part's
        share of it (summed over ranks, so shares are of rank-seconds)."""
        if not self.samples or self.wall <= 0:
            return None
        shares = {k: v / self.wall for k, v in self.parts.items()}
        shares["video_reading"] = self.video_reading / self.wall
        inside = sum(shares.values()) - (shares["video_reading"] if prefetched else 0.0)
        shares["other"] = max(0.0, 1.0 - inside)
        return {"samples": self.samples, "wall_s": self.wall, "samples_per_s": self.samples / self.wall,
                "shares": shares, "video_reading_overlapped": prefetched}


class VTCModel(lmms):
    is_simple = True

    def __init__(self, adapter: VideoLLM, compressor: Compressor, run_dir: RunDir, *,
                 frames: int, max_new_tokens: int, tasks: dict, metric: str, live_score: bool = True,
                 progress: bool = True, feature_cache: FeatureCache | None = None,
                 engine: EngineConf | None = None, breakdown: str | None = None):
        super().__init__()
        self.adapter, self.compressor, self.run_dir = adapter, compressor, run_dir
        self.frames, self.max_new_tokens = frames, max_new_tokens
        self.tasks, self.metric, self.live_score, self.progress = tasks, metric, live_score, progress
        self.done = run_dir.completed()
        self.feature_cache = feature_cache
        self.engine = engine or EngineConf()
        self.clock = Clock()
        self.breakdown = breakdown  # the document field scores are broken down by, kept in each record

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VTCModel":
        """Build from lmms_eval's own CLI: `python -m lmms_eval --model vtc --model_args
        pretrained=PATH,method=scissor,tau=0.9[,family=qwen2_5_vl,frames=32,dtype=bfloat16,
        device=cuda,max_new_tokens=16,output=DIR,seed=0] --tasks ...` (family: default from the
        checkpoint's config.json).

        Every other key is a knob of the method. Per-sample records go to `output` (default
        results/lmms_eval/<model>-<method>-<hash>, resumed like a harness run); retention targets
        that need calibration, and pipelines, need the harness (`python -m harness`)."""
        from lmms_eval import utils

        from harness.models import adapter_class, family_of
        from harness.run.identity import readable_id
        from harness.run.validate import check_method_family

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "pretrained" not in args:
            raise ValueError("--model_args needs pretrained=<model directory or hub id>")
        options = {k: args.pop(k) for k in ("pretrained", "family", "method", "frames", "dtype", "device",
                                            "max_new_tokens", "output", "seed", "attn_implementation")
                   if k in args}
        name = options.get("method", "none")
        if name == "pipeline":
            raise ValueError("method=pipeline cannot be given in --model_args (its stages are a list); "
                             "run it through the harness: python -m harness +method=pipeline ...")
        compressor = methods.build(name, **args)
        compressor.seed = int(options.get("seed", 0))
        device = str(options.get("device") or extra.get("device") or "auto")
        family = str(options.get("family") or family_of(str(options["pretrained"])))
        check_method_family(compressor, family)
        adapter = adapter_class(family)(str(options["pretrained"]), dtype=str(options.get("dtype", "bfloat16")),
                                        device=device,
                                        attn_implementation=str(options.get("attn_implementation", "sdpa")))
        frames = int(options.get("frames", 32))
        ident = {"pretrained": str(options["pretrained"]), "family": family, "method": name, "knobs": compressor.knobs(),
                 "frames": frames, "dtype": options.get("dtype", "bfloat16"), "seed": compressor.seed}
        output = options.get("output") or Path("results/lmms_eval") / readable_id(
            Path(str(options["pretrained"])).name, compressor.title, ident)
        run_dir = RunDir(output)
        run_dir.write("config.json", {"lmms_eval_model_args": arg_string, **ident})
        return cls(adapter, compressor, run_dir, frames=frames,
                   max_new_tokens=int(options.get("max_new_tokens", 16)), tasks={}, metric="",
                   live_score=False)

    @property
    def device(self):  # lmms_eval's collectives place their tensors here
        return self.adapter.device

    @property
    def throughput(self) -> dict | None:
        return self.clock.report(prefetched=self.engine.prefetch > 0)

    def _measurements(self, run: VideoPass) -> dict:
        visible = run.decode_video_visible
        return {
            "frames": run.frames,  # token frames (Qwen2.5-VL: temporal patches of two frames)
            "tokens": {"video_in": run.video_tokens_in, "video_out": run.video_tokens_out,
                       "text": run.text_tokens, "per_frame": run.frame_tokens},
            "retention": {
                **retention_numbers(run.video_tokens_in, run.text_tokens, run.layer_video_tokens,
                                    self.adapter.llm_shape,
                                    run.layer_mlp_video_tokens),
                # decode-stage methods (DyCoke): share of cached video entries attended per step
                "rho_decode_kv": sum(visible) / len(visible) if visible else None},
            "timings": run.timings,
            "vision_cached": run.vision_cached,
            "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20
                               if self.adapter.device.type == "cuda" else None),
        }

    # ---- the request loop -----------------------------------------------------------------------
    def _doc(self, req):
        context, arg1, doc_to_visual, doc_id, task_name, split = req.args
        return self.task_dict[task_name][split][doc_id]

    def _video_of(self, req):
        """The video path a request asks about, or Unreadable (its task function failed on the
        document: several lmms_eval tasks sys.exit() on a missing video; that is one failed sample)."""
        doc_to_visual = req.args[2]
        try:
            visuals = doc_to_visual(self._doc(req))
        except (Exception, SystemExit) as err:
            return Unreadable(f"SampleError: doc_to_visual failed: {type(err).__name__}: {err}")
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], str):
            return Unreadable(f"SampleError: expected exactly one video path from doc_to_visual, got "
                              f"{[type(v).__name__ for v in visuals]}")
        return visuals[0]

    def _read(self, path: str):
        return read_input(self.adapter, path, self.frames, self.compressor.needs, self.feature_cache)

    def _run(self, requests, request_type: str, answer_one):
        keys = [sample_key(req.args[4], req.args[3], request_type, req.idx) for req in requests]
        todo = [i for i, key in enumerate(keys) if key not in self.done]
        groups = group_by_video([self._video_of(requests[i]) for i in todo], grouped=self.engine.group_by_video)
        rank, world_size = distributed.world()
        mine = shard(groups, rank, world_size)
        bar = tqdm(total=sum(len(g.requests) for g in mine), desc=f"{request_type} ({self.compressor.title})",
                   disable=not self.progress)
        started = time.perf_counter()
        paths = [g.video for g in mine if isinstance(g.video, str)]
        with Prefetcher(paths, self._read, self.engine.prefetch) as fetch:
            for group in mine:
                members = [todo[j] for j in group.requests]
                self._answer_group(group.video, [requests[i] for i in members], [keys[i] for i in members],
                                   fetch, answer_one, bar)
            self.clock.parts["waiting"] += fetch.waited
        self.clock.wall += time.perf_counter() - started
        bar.close()
        if world_size > 1:  # every rank returns every result to lmms_eval
            for other, records in distributed.gather((self.clock, {k: self.done[k] for k in keys if k in self.done})):
                self.done.update(records)
                if other is not self.clock:
                    self.clock.merge(other)
        return [tuple(r) if isinstance(r, list) else r for r in (self.done[k]["result"] for k in keys)]

    def _answer_group(self, video, group: list, keys: list[str], fetch: Prefetcher, answer_one, bar) -> None:
        """Every request about one video: read and encoded once, compressed once, and its prefix
        prefilled once when the method allows; each request's timings carry its share of that."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            if isinstance(video, Unreadable):
                raise SampleError(video.reason)
            loaded = fetch.get(video)
            self.clock.video_reading += loaded.seconds
            started = time.perf_counter()
            encoded = encode_input(self.adapter, loaded, self.compressor.needs, self.feature_cache)
            self.clock.parts["vision"] += time.perf_counter() - started
            # a visual stage that reads the question runs once per question (in answer_one)
            compressed = (encoded if self.compressor.reads_question_before_llm
                          else self.adapter.compress(encoded, self.compressor))
        except (*FAILURES, SampleError) as err:
            for req, key in zip(group, keys):
                self._record(req, key, failed=err)
            bar.update(len(group))
            return
        share = 1.0 / len(group)  # of the work done once for the whole group
        compressed = replace(compressed, timings={k: v * share for k, v in compressed.timings.items()})  # Encoded too
        prefix = None
        for req, key in zip(group, keys):
            try:
                if prefix is None and self.engine.share_prefix and self.compressor.shares_prefix:
                    prefix = self.adapter.shared_prefix(compressed, self.compressor,
                                                        self.adapter.prompt_ids(req.args[0])[0])
                result, run, fields = answer_one(compressed, req.args[0], req.args[1], self._doc(req), prefix)
                if prefix is not None:  # its share of the prefix's prefill
                    run.timings["prefill"] += prefix.seconds * share
                    run.timings["ttft"] += prefix.seconds * share
                self.clock.add_run(run.timings)
                self._record(req, key, result=result, run=run, fields=fields,
                             engine={"video_requests": len(group), "shared_prefix": prefix is not None})
            except (*FAILURES, SampleError) as err:
                self._record(req, key, failed=err)
            bar.update()

    def _record(self, req, key: str, failed: Exception | None = None, result=None, run: VideoPass | None = None,
                fields: dict | None = None, engine: dict | None = None) -> None:
        """Write one sample's record (and score it, where the task allows it live)."""
        context, arg1, doc_to_visual, doc_id, task_name, split = req.args
        doc = self._doc(req)
        record = {"key": key, "task": task_name, "doc_id": doc_id, "request": req.request_type,
                  "question": context}
        for name in ("options", self.breakdown):  # so a record reads without a join with the data
            if name and name in doc:
                record[name] = doc[name]
        if failed is not None:
            record.update(status="failed", reason=f"{type(failed).__name__}: {failed}",
                          result=self._failed_result(req), prediction=None)
        else:
            record.update(status="ok", result=result, **fields, **self._measurements(run), engine=engine)
        task = self.tasks.get(task_name)
        if task is not None:
            record["target"] = task.doc_to_target(doc)
            if self.live_score and req.request_type == "generate_until":
                metrics = score_one(task, doc, record["result"])
                record["metrics"] = metrics
                value = metrics.get(self.metric)
                record["score"] = float(value) if isinstance(value, (int, float)) else None
        self.run_dir.append(record)
        self.done[key] = record

    @staticmethod
    def _failed_result(req):
        # lmms_eval still scores the sample: an empty answer (or -inf log-likelihood) counts as wrong.
        return "" if req.request_type == "generate_until" else [-math.inf, False]

    def generate_until(self, requests) -> list[str]:
        def answer(video: Compressed, context, gen_kwargs, doc, prefix):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            text, run = self.adapter.generate(video, context, self.compressor, max_new, until, prefix=prefix)
            return text, run, {"prediction": text}

        return self._run(requests, "generate_until", answer)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        def answer(video: Compressed, context, doc_to_target, doc, prefix):
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            logprob, greedy, run = self.adapter.loglikelihood(video, context, continuation, self.compressor,
                                                              prefix=prefix)
            return [logprob, greedy], run, {"prediction": None, "continuation": continuation}

        return self._run(requests, "loglikelihood", answer)

    def generate_until_multi_round(self, requests):
        raise TypeError("vtc-harness evaluates single-round tasks; multi-round generation is "
                        "not supported by its model adapters")
