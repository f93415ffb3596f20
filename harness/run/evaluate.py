"""One harness run: load model and task, evaluate through lmms_eval, record.

`run(job)` is what `python -m harness ...` calls for every job of a (multi)run, with the objects
`harness.run.job.job_from_config` made of its config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from harness.data.identity import changed, task_files, without_data_dir
from harness.data.tasks import check_task_requirements, load_tasks, prepare_task_data
from harness.lmms_compat import silent_progress, single_process_view
from harness.models.base import check_model_path
from harness.models.prepare import building, model_directory
from harness.quiet import log_file, quiet_libraries
from harness.errors import RunFailed
from harness.report.summary import summarize, summary_line, with_reference
from harness.run import distributed
from harness.run.identity import run_id, versions
from harness.run.job import Job
from harness.run.rundir import RunDir
from harness.run.validate import check_method_fits, read_model_config
from harness.timing import step


def run_dir_of(job: Job) -> Path:
    return job.results_dir / (job.run_id or run_id(job))


def run(job: Job) -> Path:
    """Evaluate one configuration; returns its results directory."""
    check_task_requirements(job.task)
    if not (job.model.train or job.model.random_init or job.model.build_tiny):
        check_model_path(job.model.path)  # a checkpoint is there before any run directory is made
    quiet_libraries(log_file())
    rank, world_size = distributed.world()
    run_dir = RunDir(run_dir_of(job), rank=rank)
    run_dir.lock()  # one process writes a run directory at a time
    try:
        return _run(job, run_dir, rank, world_size)
    finally:
        run_dir.close()


def _run(job: Job, run_dir: RunDir, rank: int, world_size: int) -> Path:
    from lmms_eval import evaluator

    from harness.data.feature_cache import FeatureCache
    from harness.models import adapter_class
    from harness.report.loggers import make_logger
    from harness.run.calibrate import calibrate, calibration_set, calibration_size, check_reachable
    from harness.run.requests import VTCModel

    model, task, choice = job.model, job.task, job.method
    done = run_dir.read("summary.json") if job.resume else None
    earlier = run_dir.read("config.json")
    if (done is not None and not done["n_failed"] and len(run_dir.completed()) >= done["n_samples"]
            and earlier is not None and not changed(earlier.get("data_files", {}), task.data_dir)
            and done.get("breakdown_field") == task.breakdown):
        # a finished run (e.g. a restarted sweep's earlier point) on unchanged data: nothing to
        # load or compute; runs with failed samples go on, to try those again, and a run asked
        # for another breakdown of its scores resumes (every sample read back) to summarise anew
        if rank == 0:  # its summary anew: a `none` run finished since fills in its agreement
            done = with_reference(done, run_dir.samples(), job.results_dir)
            run_dir.write("summary.json", done)
            make_logger(job.logger, job.results_dir).log_run(job.resolved, done, run_dir)
            print(summary_line(done) + " (already complete)", flush=True)
        return run_dir.path
    with distributed.main_process_first():  # shared files are written once
        if not job.resume and rank == 0:
            run_dir.clear_samples()
        if task.generator:
            with step(f"preparing the data of task {task.name}"):
                prepare_task_data(task)
        what = building(model)
        if what:
            with step(what):
                model_path = model_directory(model, job.cache_dir, job.seed, job.progress)
        else:
            model_path = model_directory(model, job.cache_dir, job.seed, job.progress)
    compressor = choice.compressor
    check_method_fits(compressor, read_model_config(model_path))
    with step(f"loading lmms_eval task {task.lmms_task}"):
        tasks = load_tasks(task)
    data_files = task_files(tasks, task.limit, task.overrides.get("dataset_kwargs"), task.data_dir)
    with step(f"loading model {model.name} ({model.dtype}, {model.device})"):
        adapter = adapter_class(model.family)(model_path, dtype=model.dtype, device=model.device,
                                              attn_implementation=model.attn_implementation)
    features = FeatureCache(job.cache_dir / "features", adapter.fingerprint) if job.feature_cache else None
    compressor.seed = job.seed
    calibration = None
    size = calibration_size(task.calibration_size, task.limit)
    if choice.target_retention is not None:
        calibration = calibrate(
            compressor, choice.target_retention, adapter, tasks, frames=model.frames, size=size,
            identity={"task": task.lmms_task, "overrides": without_data_dir(task.overrides, task.data_dir),
                      "seed": job.seed},
            cache_dir=job.cache_dir, feature_cache=features, data_dir=task.data_dir)
        for knob, value in calibration["knobs"].items():
            compressor = compressor.with_knob(knob, value)
    elif choice.direct_retention is not None:
        check_reachable(compressor, choice.direct_retention, getattr(adapter, "vision_shape", None),
                        lambda: calibration_set(adapter, tasks, size, model.frames, True, compressor.needs, features))
    knobs = compressor.knobs()

    if earlier is not None and rank == 0 and run_dir.completed():
        # samples on disk that answer another configuration or other data are not resumed:
        # a retention target calibrated to another knob value, regenerated or edited videos
        moved = (changed(earlier.get("data_files", {}), task.data_dir)
                 + sorted(set(data_files) - set(earlier.get("data_files", {}))))
        if earlier["method"]["knobs"] != knobs or moved:
            why = (f"it was run with {earlier['method']['knobs']}, now {knobs}" if not moved else
                   f"{len(moved)} of its data files changed since (e.g. {moved[0]})")
            print(f"note: {len(run_dir.completed())} samples of {run_dir.path.name} were discarded: {why}",
                  file=sys.stderr)
            run_dir.clear_samples()
    distributed.barrier()
    if rank == 0:
        run_dir.write("config.json", {"config": job.resolved, "world_size": world_size, "method": {
            "name": choice.name, "knobs": knobs, "label": choice.label,
            "target_retention": choice.target_retention, "calibration": calibration,
            "notes": compressor.notes()},
            "data_files": data_files})
        (run_dir.path / "config.yaml").write_text(OmegaConf.to_yaml(job.resolved))
        run_dir.write("versions.json", versions())

    lm = VTCModel(adapter, compressor, run_dir, frames=model.frames, max_new_tokens=model.max_new_tokens,
                  tasks=tasks, metric=task.metric, live_score=task.live_score, progress=job.progress,
                  feature_cache=features, engine=job.engine, breakdown=task.breakdown)
    # lmms_eval would shard documents by rank; the model shards whole videos itself (harness/run/engine.py)
    with silent_progress(), single_process_view():
        results = evaluator.simple_evaluate(
            model=lm, tasks=list(tasks.values()), limit=task.limit, batch_size=1,
            log_samples=True, bootstrap_iters=0, verbosity="ERROR", random_seed=job.seed,
            distributed_executor_backend="torchrun",
            numpy_random_seed=job.seed, torch_random_seed=job.seed, fewshot_random_seed=job.seed)
    if rank != 0:  # in a distributed run rank 0 writes the results
        return run_dir.path
    run_dir.write("lmms_eval_results.json", {k: v for k, v in results.items() if k != "samples"})
    summary = summarize(model, task, choice, job.seed, job.results_dir, knobs, run_dir, results, tasks,
                        compressor.notes(), lm.throughput)
    run_dir.write("summary.json", summary)
    make_logger(job.logger, job.results_dir).log_run(job.resolved, summary, run_dir)
    print(summary_line(summary), flush=True)
    if summary["n_samples"] and summary["n_failed"] >= summary["n_samples"]:
        raise RunFailed(every_sample_failed(summary))
    return run_dir.path


def every_sample_failed(summary: dict) -> str:
    """One line for a run none of whose samples could be answered: how many, and the commonest reason."""
    from collections import Counter

    reasons = Counter((f.get("reason") or "unknown").split(": ", 1)[0] for f in summary["failed"])
    kind, count = reasons.most_common(1)[0]
    example = next(f["reason"] for f in summary["failed"] if (f.get("reason") or "unknown").startswith(kind))
    return (f"all {summary['n_samples']} samples failed ({count} with {kind}, e.g. {example}); "
            f"results in {summary['results_dir']}")
