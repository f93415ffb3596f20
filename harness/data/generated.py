"""A generated task's data: its clips as .mp4 files and its questions.jsonl, each file written
atomically (harness.files), the questions file after every clip it names. The questions name their
videos relative to the data directory, so the data can move with a copy of the checkout or cache:
the task's YAML gives the directory at run time (`task.env.VTC_TASK_DATA`) and `video_path` joins
them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from harness.data.video import encode_mp4
from harness.files import atomic_path, write_text


DATA_ENV = "VTC_TASK_DATA"


def video_path(video: str) -> str:
    """A question's video path: as written if absolute, else under the task's data directory
    ($VTC_TASK_DATA, set by the harness from task.env), else under the working directory (where the
    task YAML's relative `data_files` is read from when lmms_eval's own CLI runs it)."""
    if os.path.isabs(video):
        return video
    return os.path.join(os.environ.get(DATA_ENV) or os.getcwd(), video)


def write_clip(path: Path, frames: np.ndarray, fps: int) -> Path:
    """uint8 (F, H, W, 3) frames as an .mp4 at `path` (harness.data.video.encode_mp4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        encode_mp4(str(tmp), frames, fps)
    return path


def write_questions(path: Path, rows: list[dict]) -> Path:
    """One JSON line per question."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
