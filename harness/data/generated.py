"""Writing a generated task's data: its clips as .mp4 files and its questions.jsonl, each file
atomically (harness.files), the questions file after every clip it names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from harness.data.video import encode_mp4
from harness.files import atomic_path, write_text


def write_clip(path: Path, frames: np.ndarray, fps: int) -> Path:
    """uint8 (F, H, W, 3) frames as an .mp4 at `path` (harness.data.video.encode_mp4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        encode_mp4(str(tmp), frames, fps)
    return path


def write_questions(path: Path, rows: list[dict]) -> Path:
    """One JSON line per question."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
