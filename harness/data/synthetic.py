"""The embedded synthetic video task: clips where what a compressor keeps decides the answer.

Every clip (16 frames, 112x112, 8 fps) holds the evidence of four question kinds at once, each in
a different share of the video's tokens, so a compressor that keeps the wrong tokens loses a
particular kind (the `kind` field of each question, for per-kind results). Sizes are in cells of
CELL px, the part of a frame one video token of the micro model covers (112 px = 8 cells; the micro
model reads frames at 224 px in 14-px patches, pooled 2x2):

- `background`: the colour of the background, which fills most of every frame; any compression
  that keeps anything keeps it;
- `flash`: the colour of a 2x2-cell square shown in only 3 of the 16 frames, 1 or 2 of the 8 the
  model samples (temporal localisation: pooling or merging over time dilutes it);
- `small`: the colour of a one-cell square that stays put in every frame (spatial detail: pooling
  space dilutes it; keeping one copy over time is enough);
- `direction`: which way the white one-cell square moves, from the middle of the frame to an edge
  (its positions over the clip: any frame after the first shows which side it went to).

The flash and the small square sit on the cell grid, apart from each other and off the mover's
path; each kind has its own palette, so a question names its object by colour family. Each kind
has a fixed question with fixed options; answers are uniform, so chance is 25 %.

The same seeded generator writes the train split (clips in memory, passed through the same H.264
round trip as the files; every clip answers all four questions) and the held-out test split (real
.mp4 files + questions.jsonl, one question per clip, kinds in turn); the splits come from
disjoint seeds.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data.generated import write_clip, write_questions
from harness.data.video import encode_mp4

SIZE, FRAMES, FPS = 112, 16, 8  # frame side (px), frames per clip, frames per second
CELL = 14  # px of a frame under one video token of the micro model
GRID = SIZE // CELL  # 8 cells a side
FLASH_FRAMES = 3  # any 3 consecutive of 16 frames hold 1-2 of the 8 sampled uniformly
PALETTES = {
    "background": {"gray": (128, 128, 128), "purple": (112, 48, 160), "teal": (0, 128, 128),
                   "brown": (128, 80, 32)},
    "flash": {"red": (230, 30, 30), "green": (40, 200, 60), "blue": (40, 80, 240),
              "yellow": (240, 220, 40)},
    "small": {"black": (0, 0, 0), "orange": (250, 130, 0), "pink": (250, 120, 200),
              "cyan": (60, 230, 240)},
}
MOVER = (245, 245, 245)  # the moving square is white
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KINDS = ("background", "flash", "small", "direction")
QUESTIONS = {
    "background": "What colour is the background?",
    "flash": "What colour is the square that appears only briefly?",
    "small": "What colour is the small square?",
    "direction": "Which way does the white square move?",
}
OPTIONS = {**{kind: list(colours) for kind, colours in PALETTES.items()}, "direction": list(DIRECTIONS)}
LETTERS = "ABCD"
PROMPT_SUFFIX = "Answer with the option's letter."
SPLIT_SEEDS = {"train": 1, "test": 2}  # disjoint streams: no test clip is a train clip
VERSION = 2  # of the generator: a data directory written by another version is written anew
SIDES = {"flash": 2, "small": 1, "mover": 1}  # object sides in cells (the test split's; training may start larger)


@dataclass
class Clip:
    frames: np.ndarray  # (FRAMES, SIZE, SIZE, 3) uint8
    answers: dict  # kind -> the option's text (a colour or a direction)
    flash: tuple[int, int]  # the flash is on screen in frames [start, end)


def mover_path(direction: str, side: int = CELL) -> list[tuple[int, int]]:
    """The top-left corner (x, y) in px per frame of a mover of `side` px: from the centre of the
    frame to the edge it moves towards, at constant speed."""
    dx, dy = DIRECTIONS[direction]
    centre = (SIZE - side) // 2
    travel = (SIZE - side) - centre if dx > 0 or dy > 0 else centre
    return [(centre + dx * round(travel * t / (FRAMES - 1)), centre + dy * round(travel * t / (FRAMES - 1)))
            for t in range(FRAMES)]


def _cells(x: int, y: int, w: int, h: int) -> set:
    """The cells a px rectangle touches."""
    return {(cx, cy) for cx in range(x // CELL, (x + w - 1) // CELL + 1)
            for cy in range(y // CELL, (y + h - 1) // CELL + 1)}


def _place(rng: random.Random, side: int, taken: set) -> tuple[int, int]:
    """A random cell-aligned top-left corner (px) for a square of `side` cells none of which is in
    `taken`."""
    spots = [(cx, cy) for cx in range(GRID - side + 1) for cy in range(GRID - side + 1)
             if not any((cx + i, cy + j) in taken for i in range(side) for j in range(side))]
    cx, cy = rng.choice(spots)
    return cx * CELL, cy * CELL


def make_clip(rng: random.Random, sides: dict | None = None) -> Clip:
    """One clip; `sides` overrides the objects' sides in cells (training may start larger): a side,
    or a list of sides to draw this clip's from."""
    sides = {kind: rng.choice(side) if isinstance(side, list) else side
             for kind, side in {**SIDES, **(sides or {})}.items()}
    answers = {kind: rng.choice(options) for kind, options in OPTIONS.items()}
    mover = sides["mover"] * CELL
    path = mover_path(answers["direction"], mover)
    taken = set().union(*(_cells(x, y, mover, mover) for x, y in path))
    flash_at = _place(rng, sides["flash"], taken)
    taken |= _cells(*flash_at, sides["flash"] * CELL, sides["flash"] * CELL)
    small_at = _place(rng, sides["small"], taken)
    start = rng.randint(0, FRAMES - FLASH_FRAMES)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    frames[:] = PALETTES["background"][answers["background"]]
    for t in range(FRAMES):
        frame = frames[t]
        x, y = small_at
        frame[y:y + sides["small"] * CELL, x:x + sides["small"] * CELL] = PALETTES["small"][answers["small"]]
        if start <= t < start + FLASH_FRAMES:
            x, y = flash_at
            frame[y:y + sides["flash"] * CELL, x:x + sides["flash"] * CELL] = PALETTES["flash"][answers["flash"]]
        x, y = path[t]
        frame[y:y + mover, x:x + mover] = MOVER
    return Clip(frames, answers, (start, start + FLASH_FRAMES))


def question(kind: str, answer: str) -> tuple[str, list[str], str]:
    """The question of `kind`, its lettered options and the letter of `answer`."""
    options = OPTIONS[kind]
    return QUESTIONS[kind], [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)], LETTERS[options.index(answer)]


def prompt_of(text: str, options: list[str]) -> str:
    """What the model reads after the video: the question, its lettered options, the instruction
    (the lmms_eval task's doc_to_text, and the trainer's prompts)."""
    return "\n".join([text, *options, PROMPT_SUFFIX])


def prompt_text(kind: str) -> str:
    """The prompt of a question of `kind` (the same for every clip)."""
    text, options, _ = question(kind, OPTIONS[kind][0])
    return prompt_of(text, options)


def round_trip(frames: np.ndarray) -> np.ndarray:
    """The frames as a reader gets them back from the .mp4 the test split writes (same codec,
    yuv420p), so the model trains on what it is tested on."""
    import av

    buffer = io.BytesIO()
    encode_mp4(buffer, frames, FPS)
    buffer.seek(0)
    with av.open(buffer, "r", format="mp4") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


class TrainSplit:
    """The train split: an endless seeded stream of clips (frames after the codec round trip)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(f"{seed}:{SPLIT_SEEDS['train']}")

    def take(self, count: int, sides: dict | None = None) -> list[Clip]:
        """The next `count` clips, with object sides `sides` (default: the test split's)."""
        clips = [make_clip(self.rng, sides) for _ in range(count)]
        for clip in clips:
            clip.frames = round_trip(clip.frames)
        return clips


def generate(data_dir: str | Path, clips: int = 240, seed: int = 0) -> Path:
    """Write the test split (`clips` .mp4 files, one question each, and questions.jsonl) under
    `data_dir` unless it is there."""
    data_dir = Path(data_dir).resolve()
    questions = data_dir / "questions.jsonl"
    stamp = data_dir / "GENERATOR.json"
    recipe = json.dumps({"version": VERSION, "clips": clips, "seed": seed})
    if questions.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return questions
    rng = random.Random(f"{seed}:{SPLIT_SEEDS['test']}")
    rows = []
    for i in range(clips):
        clip = make_clip(rng)
        kind = KINDS[i % len(KINDS)]
        video = data_dir / "videos" / f"clip_{i:04d}.mp4"
        write_clip(video, clip.frames, FPS)
        text, options, letter = question(kind, clip.answers[kind])
        rows.append({"id": f"clip_{i:04d}", "video": str(video), "kind": kind, "question": text,
                     "options": options, "answer": letter, "answer_text": clip.answers[kind]})
    write_questions(questions, rows)
    # the stamp last: a run cut before it leaves the data to be written anew, never an older
    # questions file under this recipe's stamp
    stamp.write_text(recipe)
    return questions
