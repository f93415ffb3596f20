"""Tiny stand-ins for the seven paper benchmarks, for running lmms_eval's REAL task code offline.

For each benchmark, `write_benchmark(name, root)` writes
  root/datasets/<name>/    a local dataset with the hub dataset's columns, config and split layout
                           (README.md `configs:` + parquet, or MVBench's json/<config>.json),
                           given to lmms_eval as its dataset_path;
  root/hf_home/<cache>/    generated clips at the paths the task's utils.py derives from HF_HOME
                           and its dataset_kwargs.cache_dir.
and returns the Hydra overrides that point the task there. Nothing in lmms_eval is changed.

Every row asks about a clip of a moving coloured square (harness.data.smoke); the last row's video
is missing or corrupt, to check that it fails only that sample. The five single-task benchmarks
have four rows; MVBench (a group of 20 lmms_eval tasks, one dataset config each) has a few rows
per config, LongVideoBench a few per duration group.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.data.smoke import COLOURS, DIRECTIONS, FPS, _clip
from harness.data.video import encode_mp4

ROWS = 4  # the last one has a bad video
LETTERS = "ABCDE"


@dataclass
class Fixture:
    hub_path: str  # the real dataset, for the record
    config: str | None  # its config (lmms_eval's dataset_name)
    video_path: Callable[[Path, dict], Path]  # where utils.py looks, from hf_home and a row
    bad_video: str  # "missing" or "corrupt"
    row: Callable[[int, str, list[str], int], dict]  # (i, question, options, answer index) -> row
    split: str = "test"  # the split the task reads (its test_split)
    configs: tuple[str, ...] = ()  # a group's configs, one per subtask, each its own file (MVBench)
    rows: int = ROWS  # rows in all


def _colour_question(i: int, n_options: int) -> tuple[str, list[str], int, tuple[str, str]]:
    """A question about clip i, its options (texts), the correct index and the clip's content."""
    rng = random.Random(i)
    colour, direction = rng.choice(sorted(COLOURS)), rng.choice(sorted(DIRECTIONS))
    options = rng.sample([c for c in sorted(COLOURS) if c != colour], n_options - 1) + [colour]
    rng.shuffle(options)
    return "What colour is the moving square", options, options.index(colour), (colour, direction)


# ---- one row per benchmark, with the real dataset's columns ---------------------------------------
def _videomme(i, question, options, answer):
    return {"video_id": f"{i + 1:03d}", "duration": "short", "domain": "Knowledge",
            "sub_category": "Humanity & History", "url": f"https://www.youtube.com/watch?v=fixture{i}",
            "videoID": f"fixture{i:03d}", "question_id": f"{i + 1:03d}-1",
            "task_type": "Attribute Perception", "question": question + "?",
            "options": [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)], "answer": LETTERS[answer]}


def _mlvu(i, question, options, answer):
    listed = "\n".join(f"({LETTERS[k]}) {o}" for k, o in enumerate(options))
    return {"video_name": f"fixture_{i}.mp4", "duration": 2.0, "question": f"{question}?\n{listed}",
            "candidates": options, "answer": LETTERS[answer],
            "task_type": ["plotQA", "needle", "ego", "count"][i % 4], "question_id": f"fixture_{i}"}


def _egoschema(i, question, options, answer):
    return {"question_idx": f"fixture-q{i}", "question": question + "?", "video_idx": f"fixture-{i:04d}",
            "option": [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)], "answer": str(answer)}


def _nextqa(i, question, options, answer):
    return {"video": 4000000000 + i, "frame_count": 16, "width": 96, "height": 96,
            "question": question.lower(), "answer": answer, "qid": i, "type": "DC",
            **{f"a{k}": o for k, o in enumerate(options)}}


def _activitynetqa(i, question, options, answer):
    # open-ended: the answer is the colour itself
    return {"video_name": f"fixture{i:03d}", "question_id": f"v_fixture{i:03d}_1",
            "question": question.lower(), "answer": options[answer], "type": "4"}


# MVBench: 20 configs (one per lmms_eval task mvbench_<config>), split train, json/<config>.json;
# videos under $HF_HOME/mvbench_video/<the config's source folder>/<video> (lmms_eval's DATA_LIST)
MVBENCH_CONFIGS = ("action_sequence", "moving_count", "action_prediction", "episodic_reasoning",
                   "action_antonym", "action_count", "scene_transition", "object_shuffle",
                   "object_existence", "fine_grained_pose", "unexpected_action", "moving_direction",
                   "state_change", "object_interaction", "character_order", "action_localization",
                   "counterfactual_inference", "fine_grained_action", "moving_attribute",
                   "egocentric_navigation")
MVBENCH_ROWS = 2  # per config
# LongVideoBench: its four duration groups (seconds: 8-15 s, 15-60 s, 3-10 min, 15-60 min)
LVB_GROUPS = (15, 60, 600, 3600)
LVB_ROWS = 3  # per duration group
LVB_CATEGORIES = ("S2E", "E2O", "T2A", "O3O")


def _mvbench(i, question, options, answer):
    config = MVBENCH_CONFIGS[i // MVBENCH_ROWS]
    return {"video": f"{config}_{i % MVBENCH_ROWS}.mp4", "question": question + "?",
            "candidates": options, "answer": options[answer]}


def _mvbench_video(hf_home: Path, row: dict) -> Path:
    from lmms_eval.tasks.mvbench.utils import DATA_LIST  # where its utils.py looks, per config

    return hf_home / "mvbench_video" / DATA_LIST[row["video"].rsplit("_", 1)[0]] / row["video"]


def _longvideobench(i, question, options, answer):
    group = LVB_GROUPS[i // LVB_ROWS]
    return {"video_id": f"fixture{i:03d}", "question": question + "?",
            "question_wo_referring_query": question + "?", "candidates": options,
            "correct_choice": answer, "position": [1], "topic_category": "NP-News-Programs",
            "question_category": LVB_CATEGORIES[i % len(LVB_CATEGORIES)], "level": "L1-Perception",
            "id": f"fixture{i:03d}_0", "video_path": f"fixture{i:03d}.mp4",
            "subtitle_path": f"fixture{i:03d}_en.json", "duration_group": group,
            "starting_timestamp_for_subtitles": 0.0, "duration": 2.0, "view_count": 1000,
            **{f"option{k}": options[k] if k < len(options) else "N/A" for k in range(5)}}


BENCHMARKS: dict[str, Fixture] = {
    "videomme": Fixture("lmms-eval/Video-MME", "videomme",
                        lambda h, r: h / "videomme" / "data" / f"{r['videoID']}.mp4", "missing", _videomme),
    "mlvu": Fixture("sy1998/MLVU_dev", None, lambda h, r: h / "mlvu" / r["video_name"], "corrupt", _mlvu),
    "egoschema": Fixture("lmms-eval/egoschema", "Subset",
                         lambda h, r: h / "egoschema" / "videos" / f"{r['video_idx']}.mp4", "missing",
                         _egoschema),
    "nextqa": Fixture("lmms-eval/NExTQA", "MC",
                      lambda h, r: h / "nextqa" / "NExTVideo" / f"{r['video']}.mp4", "corrupt", _nextqa),
    "activitynetqa": Fixture("lmms-eval/ActivityNetQA", None,
                             lambda h, r: h / "activitynetqa" / "all_test" / f"v_{r['video_name']}.mp4",
                             "missing", _activitynetqa),
    "mvbench": Fixture("OpenGVLab/MVBench", None, _mvbench_video, "missing", _mvbench, split="train",
                       configs=MVBENCH_CONFIGS, rows=len(MVBENCH_CONFIGS) * MVBENCH_ROWS),
    "longvideobench": Fixture("longvideobench/LongVideoBench", None,
                              lambda h, r: h / "datasets" / "longvideobench" / "videos" / r["video_path"],
                              "corrupt", _longvideobench, split="validation",
                              rows=len(LVB_GROUPS) * LVB_ROWS),
}
N_OPTIONS = {"videomme": 4, "mlvu": 4, "egoschema": 5, "nextqa": 5, "activitynetqa": 4, "mvbench": 4,
             "longvideobench": (5, 4)}  # LongVideoBench: 5 or 4 options (option4 "N/A"), in turn


def _n_options(name: str, i: int) -> int:
    n = N_OPTIONS[name]
    return n[i % len(n)] if isinstance(n, tuple) else n


def write_benchmark(name: str, root: Path, clips: int | None = None, per_clip: int = 1) -> dict:
    """Write benchmark `name`'s fixture under root; returns {"rows", "overrides", "hf_home", ...}
    ("docs": the (config, index in it) of each row: a group's subtask reads its config's rows).
    By default its rows are ROWS clips, one question each, the last clip bad; `clips` and
    `per_clip` write that many good clips asked `per_clip` questions each (NExT-QA asks about 8.5
    per video; the engine's benchmark)."""
    fx = BENCHMARKS[name]
    hf_home, dataset_dir = root / "hf_home", root / "datasets" / name
    count = fx.rows if clips is None else clips * per_clip
    rows, truths, videos = [], [], []
    for i in range(count):
        clip = i // per_clip
        question, options, answer, (colour, direction) = _colour_question(clip, _n_options(name, clip))
        row = fx.row(clip, question, options, answer)
        video = fx.video_path(hf_home, row)
        video.parent.mkdir(parents=True, exist_ok=True)
        if clips is not None or i < fx.rows - 1:
            if i % per_clip == 0:
                encode_mp4(str(video), _clip(colour, direction, random.Random(clip)), FPS)
        elif fx.bad_video == "corrupt":
            video.write_bytes(b"not a video" * 100)
        rows.append(row)
        truths.append(options[answer])
        videos.append(video)
    readme = "---\nconfigs:\n"
    if fx.configs:  # MVBench's layout: json/<config>.json, one config per subtask
        per = count // len(fx.configs)
        docs = [(fx.configs[i // per], i % per) for i in range(count)]
        (dataset_dir / "json").mkdir(parents=True, exist_ok=True)
        for k, config in enumerate(fx.configs):
            pd.DataFrame(rows[k * per:(k + 1) * per]).to_json(dataset_dir / "json" / f"{config}.json",
                                                               orient="records", indent=1)
            readme += f"- config_name: {config}\n  data_files:\n  - split: {fx.split}\n"
            readme += f"    path: json/{config}.json\n"
    else:  # the hub layout: <config>/<split>-*.parquet declared in README.md, or data/<split>-*.parquet
        docs = [(None, i) for i in range(count)]
        folder = fx.config or "data"
        (dataset_dir / folder).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(dataset_dir / folder / f"{fx.split}-00000-of-00001.parquet", index=False)
        readme += f"- config_name: {fx.config or 'default'}\n  data_files:\n  - split: {fx.split}\n"
        readme += f"    path: {folder}/{fx.split}-*\n"
    readme += f"---\n# Test fixture standing in for {fx.hub_path}\n"
    (dataset_dir / "README.md").write_text(readme)
    return {
        "rows": rows, "truths": truths, "videos": videos, "docs": docs, "hf_home": hf_home,
        "dataset_dir": dataset_dir, "bad_doc_id": docs[-1][1], "bad_config": docs[-1][0],
        "bad_video": fx.bad_video,
        "overrides": [f"task.env.HF_HOME={hf_home}", f"+task.overrides.dataset_path={dataset_dir}"],
    }
