"""Tiny stand-ins for the five paper benchmarks, for running lmms_eval's REAL task code offline.

For each benchmark, `write_benchmark(name, root)` writes
  root/datasets/<name>/    a local dataset with the hub dataset's columns, config and split layout
                           (README.md `configs:` + parquet), given to lmms_eval as its dataset_path;
  root/hf_home/<cache>/    generated clips at the paths the task's utils.py derives from HF_HOME
                           and its dataset_kwargs.cache_dir.
and returns the Hydra overrides that point the task there. Nothing in lmms_eval is changed.

Rows 0-2 ask about a clip of a moving coloured square (harness.data.smoke); row 3's video is
missing or corrupt, to check that it fails only that sample.
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
}
N_OPTIONS = {"videomme": 4, "mlvu": 4, "egoschema": 5, "nextqa": 5, "activitynetqa": 4}


def write_benchmark(name: str, root: Path) -> dict:
    """Write benchmark `name`'s fixture under root; returns {"rows", "overrides", "hf_home", ...}."""
    fx = BENCHMARKS[name]
    hf_home, dataset_dir = root / "hf_home", root / "datasets" / name
    rows, truths = [], []
    for i in range(ROWS):
        question, options, answer, (colour, direction) = _colour_question(i, N_OPTIONS[name])
        row = fx.row(i, question, options, answer)
        video = fx.video_path(hf_home, row)
        video.parent.mkdir(parents=True, exist_ok=True)
        if i < ROWS - 1:
            encode_mp4(str(video), _clip(colour, direction, random.Random(i)), FPS)
        elif fx.bad_video == "corrupt":
            video.write_bytes(b"not a video" * 100)
        rows.append(row)
        truths.append(options[answer])
    # the hub layout: <config>/test-*.parquet declared in README.md, or data/test-*.parquet
    folder = fx.config or "data"
    (dataset_dir / folder).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(dataset_dir / folder / "test-00000-of-00001.parquet", index=False)
    readme = "---\nconfigs:\n"
    readme += f"- config_name: {fx.config or 'default'}\n  data_files:\n  - split: test\n"
    readme += f"    path: {folder}/test-*\n---\n# Test fixture standing in for {fx.hub_path}\n"
    (dataset_dir / "README.md").write_text(readme)
    return {
        "rows": rows, "truths": truths, "hf_home": hf_home, "dataset_dir": dataset_dir,
        "bad_doc_id": ROWS - 1, "bad_video": fx.bad_video,
        "overrides": [f"task.env.HF_HOME={hf_home}", f"+task.overrides.dataset_path={dataset_dir}"],
    }
