"""The embedded smoke task's data: short .mp4 clips of a coloured square moving on black.

Each clip gets one multiple-choice question (colour or direction of motion) with four lettered
options. Written once, deterministically from a seed, as real H.264/MPEG-4 files that the harness
reads back with decord like any benchmark video.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from harness.data.generated import write_clip, write_questions

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 70, 230),
           "yellow": (235, 220, 40), "white": (240, 240, 240), "purple": (150, 50, 200)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
LETTERS = "ABCD"
SIZE, FRAMES, FPS, SIDE = 96, 16, 8, 24


def _clip(colour, direction, rng: random.Random) -> np.ndarray:
    dx, dy = DIRECTIONS[direction]
    travel = SIZE - SIDE - 8
    x0 = 4 if dx > 0 else (4 + travel if dx < 0 else rng.randint(4, 4 + travel))
    y0 = 4 if dy > 0 else (4 + travel if dy < 0 else rng.randint(4, 4 + travel))
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t in range(FRAMES):
        x = x0 + dx * round(travel * t / (FRAMES - 1))
        y = y0 + dy * round(travel * t / (FRAMES - 1))
        frames[t, y:y + SIDE, x:x + SIDE] = COLOURS[colour]
    return frames


def _question(kind: str, answer: str, choices: list[str], rng: random.Random) -> tuple[str, list, str]:
    options = rng.sample([c for c in choices if c != answer], 3) + [answer]
    rng.shuffle(options)
    ask = ("What colour is the moving square?" if kind == "colour"
           else "In which direction does the square move?")
    return ask, [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)], LETTERS[options.index(answer)]


def generate(data_dir: str | Path, clips: int = 24, seed: int = 0) -> Path:
    """Write `clips` videos and `questions.jsonl` under `data_dir` unless already there."""
    data_dir = Path(data_dir).resolve()
    questions = data_dir / "questions.jsonl"
    if questions.is_file():
        return questions
    rng = random.Random(seed)
    rows = []
    for i in range(clips):
        colour, direction = rng.choice(sorted(COLOURS)), rng.choice(sorted(DIRECTIONS))
        video = f"videos/clip_{i:03d}.mp4"
        write_clip(data_dir / video, _clip(colour, direction, rng), FPS)
        kind = "colour" if i % 2 == 0 else "direction"
        answer, choices = (colour, sorted(COLOURS)) if kind == "colour" else (direction, sorted(DIRECTIONS))
        question, options, letter = _question(kind, answer, choices, rng)
        rows.append({"id": f"clip_{i:03d}", "video": video, "kind": kind,
                     "question": question, "options": options, "answer": letter})
    write_questions(questions, rows)  # the file's presence marks a complete data set
    return questions
