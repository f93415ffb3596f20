"""From lmms_eval's results and the per-sample records to a run summary and its one-line form.

A task that is an lmms_eval group (MVBench) runs as its leaf tasks: its score is the group's own
aggregate, computed from the leaves' results by lmms_eval's group code with the group's config, and
`task.breakdown: lmms_task` scores it per leaf task.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from harness.errors import ConfigError
from harness.lmms_compat import group_scores, is_mean
from harness.run.rundir import RunDir

TIMINGS = ("vision", "compressor", "prefill", "decode", "ttft")
LEAF_TASKS = "lmms_task"  # task.breakdown of a group: a score per leaf task (not a document field)


def to_100(value: float, scale: float, where: str) -> float:
    """A native metric value on 0-100; a value outside [0, scale] means the scale is wrong."""
    if not isinstance(value, (int, float)) or not 0 <= value <= scale * (1 + 1e-9):
        raise ConfigError(f"{where}={value!r}: expected a number in [0, {scale:g}] (task.scale); "
                          "the task's metric scale is misconfigured")
    return 100.0 * value / scale


def metric_value(results: dict, task: str, metric: str) -> tuple[str, float]:
    """lmms_eval's aggregated value of `metric` for `task` (the key is 'metric,filter')."""
    per_task = results["results"].get(task, {})
    keys = [k for k in per_task if k.split(",")[0] == metric and "stderr" not in k]
    if not keys:
        available = sorted({k.split(",")[0] for k in per_task if "stderr" not in k and "," in k})
        raise ConfigError(f"task.metric={metric}: lmms_eval reported no such metric for {task} "
                          f"(it reported {', '.join(available) or 'nothing'})")
    return keys[0], per_task[keys[0]]


def leaf_names(task, tasks) -> list[str]:
    """The lmms_eval tasks whose samples a run has: its task, or the leaf tasks of its group."""
    return list(tasks) if tasks and task.lmms_task not in tasks else [task.lmms_task]


def with_group_scores(results: dict, task, tasks) -> dict:
    """lmms_eval's results per task, with the aggregate of the run's group when its task is one:
    the leaf tasks are evaluated on their own, so lmms_eval's evaluator reports no group; its
    group code (lmms_compat.group_scores) computes it here from the leaves' results and the
    group's config (its aggregate_metric_list) as it does for a group it evaluates."""
    per_task = results["results"]
    if leaf_names(task, tasks) == [task.lmms_task] or task.lmms_task in per_task:
        return per_task
    per_task = copy.deepcopy(per_task)
    for leaf, counts in results.get("n-samples", {}).items():  # each leaf's size, as lmms_eval has it
        if leaf in per_task:
            per_task[leaf].setdefault("samples", counts["effective"])
    merged = group_scores(per_task, tasks.task_dict)
    if not any("," in k for k in merged.get(task.lmms_task, {})):
        raise ConfigError(f"task.lmms_task={task.lmms_task}: lmms_eval's group config declares no "
                          "aggregate of its tasks' scores; give it one in "
                          "task.overrides.aggregate_metric_list (see conf/task/mvbench.yaml)")
    return dict(merged)


def _group_value(tasks, group: str, key: str, per_leaf: dict[str, tuple[object, int]]):
    """The group's aggregate of given leaf values (value, sample count), by lmms_eval's group code."""
    metric, _, filter_key = key.partition(",")
    per_task = {leaf: {"alias": leaf, key: value, f"{metric}_stderr,{filter_key}": "N/A", "samples": n}
                for leaf, (value, n) in per_leaf.items()}
    return group_scores(per_task, tasks.task_dict)[group][key]


@contextlib.contextmanager
def _quiet_lmms_eval():
    from loguru import logger  # lmms_eval's aggregations log every call

    logger.disable("lmms_eval")
    try:
        yield
    finally:
        logger.enable("lmms_eval")


def bootstrap_ci(values, statistic=None, iters: int = 1000, seed: int = 0) -> list[float] | None:
    """95 % percentile bootstrap interval of `statistic` (default: the mean) over samples.

    `statistic` takes a list of per-sample values; for benchmarks whose per-sample metric is a
    record (VideoMME, MLVU, ...) it is the task's own lmms_eval aggregation.
    """
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(iters, len(values)))
    if statistic is None:
        stats = np.asarray(values, dtype=float)[draws].mean(1)
    else:
        with _quiet_lmms_eval():
            stats = np.array([statistic([values[i] for i in draw]) for draw in draws])
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def stratified_bootstrap_ci(strata: dict[str, list], statistic, iters: int = 1000,
                            seed: int = 0) -> list[float] | None:
    """95 % percentile bootstrap interval of `statistic` ({stratum: its resampled values} -> a
    number), each stratum resampled within itself (a group's score: each leaf task keeps its size)."""
    if sum(len(v) for v in strata.values()) < 2 or any(not v for v in strata.values()):
        return None
    rng = np.random.default_rng(seed)
    draws = {name: rng.integers(0, len(v), size=(iters, len(v))) for name, v in strata.items()}
    with _quiet_lmms_eval():
        stats = np.array([statistic({name: [v[i] for i in draws[name][it]] for name, v in strata.items()})
                          for it in range(iters)])
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def _aggregation(task_obj, metric: str):
    """The task's own lmms_eval aggregation of `metric` (one that may write files gets args=None)."""
    aggregate = task_obj.aggregation().get(metric) if task_obj is not None else None
    if aggregate is not None and "args" in inspect.signature(aggregate).parameters:
        aggregate = functools.partial(aggregate, args=None)
    return aggregate


def score_ci(task, seed: int, task_obj, key: str, per_sample: list) -> list[float] | None:
    """The score's 95 % CI on 0-100, bootstrapping the task's own lmms_eval aggregation over the
    per-sample records (a plain mean for scalar metrics aggregated by their mean)."""
    where = f"{task.lmms_task}.{key}"
    aggregate = task_obj.aggregation().get(task.metric) if task_obj is not None else None
    scalar = all(isinstance(v, (int, float)) for v in per_sample)
    if scalar and (aggregate is None or is_mean(aggregate)):
        return bootstrap_ci([to_100(float(v), task.scale, where) for v in per_sample],
                            seed=seed)
    if aggregate is None:
        return None
    aggregate = _aggregation(task_obj, task.metric)
    try:
        return bootstrap_ci(per_sample, lambda vs: to_100(aggregate(vs), task.scale, where),
                            seed=seed)
    except (AttributeError, TypeError) as err:  # it needs lmms_eval's CLI arguments: no CI
        print(f"note: no confidence interval for {where}: its aggregation cannot be re-run "
              f"outside lmms_eval ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def group_score_ci(task, seed: int, tasks, key: str, per_leaf: dict[str, list]) -> list[float] | None:
    """A group's score's 95 % CI on 0-100: each leaf's per-sample records resampled within the
    leaf, scored by the leaf's own aggregation, then the group's aggregate by lmms_eval's code."""
    where = f"{task.lmms_task}.{key}"
    aggregates = {leaf: _aggregation(tasks[leaf], task.metric) for leaf in per_leaf}
    if any(a is None for a in aggregates.values()):
        return None

    def statistic(draw: dict[str, list]) -> float:
        values = {leaf: (aggregates[leaf](vs), len(vs)) for leaf, vs in draw.items()}
        return to_100(_group_value(tasks, task.lmms_task, key, values), task.scale, where)

    try:
        return stratified_bootstrap_ci(per_leaf, statistic, seed=seed)
    except (AttributeError, TypeError) as err:  # it needs lmms_eval's CLI arguments: no CI
        print(f"note: no confidence interval for {where}: its aggregation cannot be re-run "
              f"outside lmms_eval ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def _stats(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def agreement(records: list[dict], reference: list[dict]) -> float | None:
    """Share of samples whose answer equals the reference run's answer on the same sample."""
    ref = {r["key"]: r.get("prediction") for r in reference if r.get("status") == "ok"}
    pairs = [(r.get("prediction"), ref[r["key"]]) for r in records
             if r.get("status") == "ok" and r["key"] in ref and r.get("request") == "generate_until"]
    if not pairs:
        return None
    return sum(a.strip() == b.strip() for a, b in pairs) / len(pairs)


def live_score_mismatches(records: list[dict], logged: list[dict], metric: str) -> list:
    """Doc ids whose score written at completion differs from lmms_eval's own final scoring."""
    live = {r["doc_id"]: r["score"] for r in records if r.get("score") is not None}
    return sorted(s["doc_id"] for s in logged if s["doc_id"] in live
                  and isinstance(s.get(metric), (int, float)) and abs(live[s["doc_id"]] - s[metric]) > 1e-9)


def caveats(model, task) -> list[str]:
    """What the scores of this setup are, shown beside them everywhere (summary line, tables,
    plots): the task's and the model's caveats, and "random weights" for a random_init model."""
    notes = [task.caveat, model.caveat]
    if model.random_init and not model.caveat:
        notes.append("random weights")
    return [n for n in notes if n]


def breakdown(task, seed: int, logged: list[dict], task_obj=None) -> dict | None:
    """Score, 95 % CI and count per value of the document field `task.breakdown` (e.g. the
    synthetic task's question kind), from lmms_eval's logged samples; None without a breakdown.
    A metric that is a number per sample is averaged per value; one that is a record per sample
    (LongVideoBench's) is scored per value by the task's own aggregation (`task_obj`'s)."""
    from harness.lmms_compat import logged_doc

    field = task.breakdown
    if not field:
        return None
    aggregate = _aggregation(task_obj, task.metric)
    groups: dict[str, list] = {}
    records = False
    for sample in logged:
        doc = logged_doc(sample)
        if field not in doc:
            raise ConfigError(f"task.breakdown={field}: document {sample['doc_id']} of "
                              f"{task.lmms_task} has no field {field!r}")
        value = sample.get(task.metric)
        if not isinstance(value, (int, float)):
            if aggregate is None:
                raise ConfigError(f"task.breakdown={field}: the metric {task.metric} is not a number "
                                  "per sample, so it cannot be broken down by a document field")
            records = True
        groups.setdefault(str(doc[field]), []).append(value)
    if records:  # the task's own aggregation on each value's samples
        return {group: {"score": _aggregate_100(aggregate, values, task),
                        "score_ci95": score_ci(task, seed, task_obj, task.metric, values),
                        "n": len(values)} for group, values in groups.items()}
    groups = {g: [to_100(float(v), task.scale, task.lmms_task) for v in vs] for g, vs in groups.items()}
    return {group: {"score": statistics.fmean(values), "score_ci95": bootstrap_ci(values, seed=seed),
                    "n": len(values)} for group, values in groups.items()}


def _aggregate_100(aggregate, values: list, task) -> float:
    with _quiet_lmms_eval():
        return to_100(aggregate(values), task.scale, task.lmms_task)


def by_leaf_task(task, seed: int, tasks, per_task: dict, key: str, per_leaf: dict[str, list]) -> dict:
    """Score (lmms_eval's own, of each leaf task), 95 % CI and count per leaf task of a group
    (task.breakdown: lmms_task), named without the group's prefix (mvbench_action_sequence ->
    action_sequence)."""
    if leaf_names(task, tasks) == [task.lmms_task]:
        raise ConfigError(f"task.breakdown={LEAF_TASKS}: {task.lmms_task} is one lmms_eval task, "
                          "not a group of tasks to break its score down by")
    prefix = f"{task.lmms_task}_"
    return {(leaf[len(prefix):] if leaf.startswith(prefix) else leaf): {
        "score": to_100(per_task[leaf][key], task.scale, f"{leaf}.{key}"),
        "score_ci95": score_ci(task, seed, tasks[leaf], key, per_leaf[leaf]),
        "n": len(per_leaf[leaf])} for leaf in per_leaf}


def setting_of(model, task) -> str:
    """What a run's answers are comparable on, apart from the method: the model (its weights,
    frames, dtype, device type) and the task (with its overrides and limit). Runs of one setting
    share their `none` reference."""
    from harness.data.identity import without_data_dir
    from harness.files import digest
    from harness.run.identity import model_identity

    return digest({"model": model_identity(model), "task": task.lmms_task, "limit": task.limit,
                   "overrides": without_data_dir(task.overrides, task.data_dir)})[:12]


def find_reference_run(setting: str, results_dir: Path, this: Path | None = None) -> Path | None:
    """The finished `none` run of `setting` among the run directories under `results_dir`."""
    for summary_file in sorted(Path(results_dir).glob("*/summary.json")):
        if summary_file.parent == this:
            continue
        try:
            s = json.loads(summary_file.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if s.get("method") == "none" and s.get("setting") == setting:
            return summary_file.parent
    return None


def with_reference(summary: dict, records: list[dict], results_dir: Path) -> dict:
    """`summary` with its agreement with the `none` run of its setting, found now (a reference run
    finished after this one still fills it in when the run is asked for again)."""
    if summary["method"] == "none":
        return {**summary, "agreement_with_none": 1.0, "reference_run": None}
    reference = find_reference_run(summary.get("setting"), results_dir, Path(summary["results_dir"]))
    agree = agreement(records, RunDir(reference).samples()) if reference else None
    return {**summary, "agreement_with_none": agree, "reference_run": reference.name if reference else None}


def summarize(model, task_conf, choice, seed: int, results_dir: Path, knobs: dict, run_dir: RunDir,
              results: dict, tasks: dict, notes: dict | None = None, throughput: dict | None = None) -> dict:
    """The run's summary.json from lmms_eval's results and the per-sample records (model, task_conf:
    the run's ModelConf and TaskConf; choice: its MethodChoice; throughput: the request loop's, for
    the samples this invocation computed)."""
    task = task_conf.lmms_task
    leaves = leaf_names(task_conf, tasks)  # [task], or a group's leaf tasks
    records = [r for r in run_dir.samples() if r["task"] in leaves]
    ok = [r for r in records if r.get("status") == "ok"]
    per_task = with_group_scores(results, task_conf, tasks)
    key, native = metric_value({"results": per_task}, task, task_conf.metric)
    per_leaf = {leaf: results.get("samples", {}).get(leaf, []) for leaf in leaves}
    logged = [s for leaf in leaves for s in per_leaf[leaf]]
    per_sample = [s.get(task_conf.metric) for s in logged]
    values = {leaf: [s.get(task_conf.metric) for s in per_leaf[leaf]] for leaf in leaves}
    if leaves == [task]:
        ci = score_ci(task_conf, seed, tasks.get(task), key, per_sample)
        mismatched = live_score_mismatches(records, logged, task_conf.metric)
    else:  # a group: doc ids are per leaf task
        ci = group_score_ci(task_conf, seed, tasks, key, values)
        mismatched = [f"{leaf}/{doc_id}" for leaf in leaves for doc_id in live_score_mismatches(
            [r for r in records if r["task"] == leaf], per_leaf[leaf], task_conf.metric)]
    score_by = (by_leaf_task(task_conf, seed, tasks, per_task, key, values) if task_conf.breakdown == LEAF_TASKS
                else breakdown(task_conf, seed, logged, tasks.get(task)))
    if mismatched:
        print(f"warning: {len(mismatched)} per-sample scores written as samples completed differ from "
              f"lmms_eval's final scoring (doc ids {mismatched[:10]}); the summary uses lmms_eval's",
              file=sys.stderr)
    # compute times: a video served by the feature cache carries the encoding time measured when
    # its entry was made (n_vision_cached says how many); the wall clock is `throughput`
    timings = {name: _stats([r["timings"].get(name) for r in ok]) for name in TIMINGS}
    prefill = sum(r["timings"].get("prefill", 0.0) for r in ok)
    summary = {
        "run_id": run_dir.path.name, "task": task_conf.name, "task_label": task_conf.label,
        "lmms_task": task, "model": model.name, "family": model.family, "model_path": model.path,
        "caveats": caveats(model, task_conf), "frames": model.frames,
        "limit": task_conf.limit, "method": choice.title, "knobs": knobs, "label": choice.label,
        "stages": sorted(choice.compressor.stages),
        "method_notes": notes or {},
        "target_retention": choice.target_retention,
        "requested_retention": (choice.target_retention if choice.target_retention is not None
                                else choice.direct_retention),
        "metric": key, "metric_native": native, "scale": task_conf.scale, "judge": task_conf.judge,
        "chance": task_conf.chance,
        "score": to_100(native, task_conf.scale, f"{task}.{key}"), "score_ci95": ci,
        "breakdown_field": task_conf.breakdown, "score_by": score_by,
        "n_samples": len(per_sample) or len(records), "n_failed": len(records) - len(ok),
        "failed": [{"key": r["key"], "reason": r.get("reason")} for r in records if r.get("status") != "ok"],
        "live_score_mismatches": mismatched,
        "retention": {name: _stats([r["retention"].get(name) for r in ok])
                      for name in ("rho_tok", "rho_avg", "rho_flops", "rho_visual", "rho_decode_kv")},
        "timings": timings,
        # compute time per sample: to the first token (vision, compressor and prefill), then decoding
        "seconds_per_sample": _stats([r["timings"].get("ttft", 0.0) + r["timings"].get("decode", 0.0)
                                      for r in ok]),
        "n_vision_cached": sum(bool(r.get("vision_cached")) for r in ok),
        "throughput": throughput,
        "compressor_share_of_prefill": (sum(r["timings"].get("compressor", 0.0) for r in ok) / prefill
                                        if prefill else None),
        "setting": setting_of(model, task_conf),
        "results_dir": str(run_dir.path),
    }
    return with_reference(summary, records, Path(results_dir))


def summary_line(s: dict) -> str:
    ret = s["retention"]["rho_tok"]
    sec = s["seconds_per_sample"]
    parts = [
        "".join(f"[{', '.join(s['caveats'])}] " if s.get("caveats") else "") + f"{s['task']}",
        f"{s['model']}",
        f"{s['method']}" + (f" {s['label']}" if s["label"] else "")
        + "".join(f" [{k}: {v}]" for k, v in (s.get("method_notes") or {}).items()),
        f"retention {100 * ret['mean']:.1f}% (rho_tok, over samples {100 * ret['min']:.1f}-{100 * ret['max']:.1f}%; "
        f"rho_avg {100 * s['retention']['rho_avg']['mean']:.1f}%, "
        f"FLOPs {100 * s['retention']['rho_flops']['mean']:.1f}%"
        + (f"; decode KV {100 * s['retention']['rho_decode_kv']['mean']:.1f}%"
           if s["retention"].get("rho_decode_kv") else "") + ")" if ret else "retention n/a",
        f"score {s['score']:.1f}" + (f" [95% CI {s['score_ci95'][0]:.1f}, {s['score_ci95'][1]:.1f}]"
                                     if s["score_ci95"] else "")
        + (f" (chance {s['chance']:g})" if s.get("chance") is not None else "")
        + (" (" + ", ".join(f"{g} {v['score']:.1f}" for g, v in s["score_by"].items()) + ")"
           if s.get("score_by") else ""),
        f"{sec['mean']:.3f} s/sample" if sec else "n/a s/sample",
        *([f"{s['throughput']['samples_per_s']:.2f} samples/s"] if s.get("throughput") else []),
        (f"compressor {1000 * s['timings']['compressor']['mean']:.2f} ms "
         f"({100 * s['compressor_share_of_prefill']:.1f}% of prefill)")
        if s["timings"].get("compressor") and s["compressor_share_of_prefill"] is not None
        else "compressor n/a",
        f"{s['n_samples']} samples, {s['n_failed']} failed",
        f"-> {s['results_dir']}",
    ]
    return " | ".join(parts)
