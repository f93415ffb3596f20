"""The harness model as an lmms_eval model: a video LLM (any family of harness/models) + one compressor.

It answers lmms_eval's requests one sample at a time, writes each sample's record (prediction,
target, score, retention, timings) the moment it completes, and serves samples already on disk
from there, which is what makes a re-run resume.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

import methods
from harness.data.feature_cache import FeatureCache, encode_file
from harness.data.video import VideoError
from harness.lmms_compat import score_one
from harness.models.base import Encoded, VideoLLM, VideoPass
from harness.run.rundir import RunDir, sample_key
from methods.core.base import Compressor
from methods.core.flops import retention_numbers


class SampleError(RuntimeError):
    """A sample that cannot be run (bad document or media); recorded as failed, the run goes on."""


class VTCModel(lmms):
    is_simple = True

    def __init__(self, adapter: VideoLLM, compressor: Compressor, run_dir: RunDir, *,
                 frames: int, max_new_tokens: int, tasks: dict, metric: str, live_score: bool = True,
                 progress: bool = True, feature_cache: FeatureCache | None = None):
        super().__init__()
        self.adapter, self.compressor, self.run_dir = adapter, compressor, run_dir
        self.frames, self.max_new_tokens = frames, max_new_tokens
        self.tasks, self.metric, self.live_score, self.progress = tasks, metric, live_score, progress
        self.done = run_dir.completed()
        self.feature_cache = feature_cache
        self._last_video: tuple[str, Encoded] | None = None  # several requests of one document

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

    # ---- media ----------------------------------------------------------------------------------
    def _video(self, visuals) -> Encoded:
        """The encoded video of a document: from memory, from the feature cache, or computed."""
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], str):
            raise SampleError(f"expected exactly one video path from doc_to_visual, got "
                              f"{[type(v).__name__ for v in visuals]}")
        path = visuals[0]
        if self._last_video is not None and self._last_video[0] == path:
            return replace(self._last_video[1], timings={}, cached=True)
        encoded = encode_file(self.adapter, path, self.frames, self.compressor.needs,
                              self.feature_cache)
        self._last_video = (path, encoded)
        return encoded

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
    def _run(self, requests, request_type: str, answer_one):
        results, scored, score_sum, measured, retention_sum = [], 0, 0.0, 0, 0.0
        bar = tqdm(requests, desc=f"{request_type} ({self.compressor.title})", disable=not self.progress)
        for req in bar:
            context, arg1, doc_to_visual, doc_id, task_name, split = req.args
            key = sample_key(task_name, doc_id, request_type, req.idx)
            record = self.done.get(key)
            if record is None:
                record = self._answer(req, key, answer_one)
            results.append(record["result"])
            if record.get("score") is not None:
                scored, score_sum = scored + 1, score_sum + record["score"]
            if record.get("retention"):
                measured, retention_sum = measured + 1, retention_sum + record["retention"]["rho_tok"]
            bar.set_postfix(acc=f"{100 * score_sum / scored:.1f}" if scored else "-",
                            ret=f"{100 * retention_sum / measured:.1f}%" if measured else "-")
        return [tuple(r) if isinstance(r, list) else r for r in results]

    def _answer(self, req, key, answer_one) -> dict:
        context, arg1, doc_to_visual, doc_id, task_name, split = req.args
        doc = self.task_dict[task_name][split][doc_id]
        record = {"key": key, "task": task_name, "doc_id": doc_id, "request": req.request_type}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            try:
                visuals = doc_to_visual(doc)
            except (Exception, SystemExit) as err:  # a task function failing on this document;
                # several lmms_eval tasks (videomme, mlvu, egoschema, activitynetqa) sys.exit() on a
                # missing video: that is one failed sample, not the end of the run
                raise SampleError(f"doc_to_visual failed: {type(err).__name__}: {err}") from err
            result, run, fields = answer_one(self._video(visuals), context, arg1, doc)
            record.update(status="ok", result=result, **fields, **self._measurements(run))
        except (VideoError, SampleError, torch.OutOfMemoryError) as err:
            record.update(status="failed", reason=f"{type(err).__name__}: {err}",
                          result=self._failed_result(req), prediction=None)
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
        return record

    @staticmethod
    def _failed_result(req):
        # lmms_eval still scores the sample: an empty answer (or -inf log-likelihood) counts as wrong.
        return "" if req.request_type == "generate_until" else [-math.inf, False]

    def generate_until(self, requests) -> list[str]:
        def answer(video, context, gen_kwargs, doc):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            text, run = self.adapter.generate(video, context, self.compressor, max_new, until)
            return text, run, {"prediction": text}

        return self._run(requests, "generate_until", answer)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        def answer(video, context, doc_to_target, doc):
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            logprob, greedy, run = self.adapter.loglikelihood(video, context, continuation,
                                                              self.compressor)
            return [logprob, greedy], run, {"prediction": None, "continuation": continuation}

        return self._run(requests, "loglikelihood", answer)

    def generate_until_multi_round(self, requests):
        raise TypeError("vtc-harness evaluates single-round tasks; multi-round generation is "
                        "not supported by its model adapters")
