"""The embedded synthetic video task: clips where what a compressor keeps decides the answer.

Every clip (16 frames, 112x112, 8 fps) holds the evidence of four question kinds at once, each in
a different share of the video's tokens, so a compressor that keeps the wrong tokens loses a
particular kind (the `kind` field of each question, for per-kind results). Sizes are in cells of
CELL px, the part of a frame one video token of the micro model covers (112 px = 8 cells; the micro
model reads frames at 224 px in 14-px patches, pooled 2x2):

- `background`: the base colour of the background, which fills most of every frame; any
  compression that keeps anything keeps it;
- `flash`: the colour of a 2x2-cell square shown in only 3 of the 16 frames, 1 or 2 of the 8 the
  model samples (temporal localisation: pooling or merging over time dilutes it);
- `small`: the colour of a one-cell square that stays put in every frame (spatial detail: pooling
  space dilutes it; keeping one copy over time is enough);
- `direction`: which way the white one-cell square moves, from the middle of the frame to an edge
  (where it is in any later frame tells it).

The scenes have the statistics of real video rather than flat colours, so that no two tokens are
the same and similarity thresholds act as they do on real clips: the background is the base colour
under a procedural texture (fractal value noise and a gradient) that the camera pans across over
the clip, with a hand-held shake of a few px per frame (frames a real benchmark samples are seconds
apart, so the same place is rarely the same pixels twice), the lighting drifts, 2-4 distractor
objects in colours no question asks about sit or drift in the frame, and every frame gets sensor
noise; the clip then goes through H.264 like any video. The
flash, the small square and the mover sit on the cell grid, apart from each other and from the
distractors; each kind has its own palette, so a question names its object by colour family. Each
kind has a fixed question with fixed options; answers are uniform, so chance is 25 %.

Every pixel's class (which colour of which object, or the background) is rendered with the frame
(`Clip.labels`): the micro model's vision stage learns from it. The same seeded generator makes the
train split (clips in memory, through the same H.264 round trip as the files) and the held-out test
split (real .mp4 files + questions.jsonl with every question of every clip); the splits come from
disjoint seeds. Video paths in questions.jsonl are relative to its directory.
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
DISTRACTORS = {"olive": (110, 110, 30), "navy": (20, 30, 100), "maroon": (100, 20, 40),
               "beige": (210, 190, 150)}  # no question asks about these
# the colour classes of Clip.labels: background, flash, small colours, the mover, the distractors
CLASSES = [f"{group}:{name}" for group, palette in PALETTES.items() for name in palette] + \
    ["mover"] + [f"distractor:{name}" for name in DISTRACTORS]
COLOURS = np.array([rgb for palette in PALETTES.values() for rgb in palette.values()] + [MOVER]
                   + list(DISTRACTORS.values()), dtype=np.float32)
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
VERSION = 4  # of the generator: a data directory written by another version is written anew
SIDES = {"flash": 2, "small": 1, "mover": 1}  # object sides in cells (the test split's; training may start larger)
PAN = 64  # px the camera may pan over a clip
SHAKE = 4  # px: the camera's hand-held offset per frame, drawn in [-SHAKE, SHAKE] on each axis
TEXTURE_FALLOFF = 0.8  # of the texture's octaves: fine detail at the scale of a cell stays visible
NOISE = 4.0  # sensor noise, std in levels


@dataclass
class Clip:
    frames: np.ndarray  # (FRAMES, SIZE, SIZE, 3) uint8
    labels: np.ndarray  # (FRAMES, SIZE, SIZE) uint8: the class (index into CLASSES) of every pixel
    answers: dict  # kind -> the option's text (a colour or a direction)
    flash: tuple[int, int]  # the flash is on screen in frames [start, end)


def class_of(group: str, name: str) -> int:
    return CLASSES.index(f"{group}:{name}")


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
    return {(cx, cy) for cx in range(max(0, x // CELL), min(GRID - 1, (x + w - 1) // CELL) + 1)
            for cy in range(max(0, y // CELL), min(GRID - 1, (y + h - 1) // CELL) + 1)}


def _place(rng: random.Random, side: int, taken: set) -> tuple[int, int]:
    """A random cell-aligned top-left corner (px) for a square of `side` cells none of which is in
    `taken`."""
    spots = [(cx, cy) for cx in range(GRID - side + 1) for cy in range(GRID - side + 1)
             if not any((cx + i, cy + j) in taken for i in range(side) for j in range(side))]
    cx, cy = rng.choice(spots)
    return cx * CELL, cy * CELL


def value_noise(rng: np.random.Generator, size: int, octaves: int = 6, falloff: float = 0.7) -> np.ndarray:
    """(size, size) fractal value noise in about [-1, 1]: random values on grids of 3, 5, 9, ...
    points, bilinearly upsampled, octave o weighted falloff^o (a cheap stand-in for natural
    texture's falling spectrum)."""
    out = np.zeros((size, size), np.float32)
    for octave in range(octaves):
        points = 2 ** (octave + 1) + 1
        grid = rng.uniform(-1, 1, (points, points)).astype(np.float32)
        axis = np.linspace(0, points - 1, size, dtype=np.float32)
        i0 = np.minimum(axis.astype(int), points - 2)
        w = axis - i0
        rows = grid[i0] * (1 - w)[:, None] + grid[i0 + 1] * w[:, None]  # (size, points)
        out += falloff ** octave * (rows[:, i0] * (1 - w) + rows[:, i0 + 1] * w)
    return out / sum(falloff ** o for o in range(octaves))


def _background(rng: np.random.Generator, base) -> np.ndarray:
    """(FRAMES, SIZE, SIZE, 3) float: the base colour under a texture and a gradient, seen by a
    camera that pans at constant speed and shakes by up to SHAKE px per frame."""
    world = SIZE + PAN + 2 * SHAKE
    texture = 70.0 * value_noise(rng, world, falloff=TEXTURE_FALLOFF)[..., None] + 14.0 * np.stack(
        [value_noise(rng, world, 3) for _ in range(3)], -1)  # luminance, and a little chroma
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:world, 0:world].astype(np.float32) / world - 0.5
    gradient = 30.0 * (np.cos(angle) * xs + np.sin(angle) * ys)
    world_rgb = np.asarray(base, np.float32) + texture + gradient[..., None]
    vx, vy = rng.uniform(-1, 1, 2) * PAN / (FRAMES - 1) / np.sqrt(2)
    x0, y0 = rng.uniform(0, PAN - abs(vx) * (FRAMES - 1)), rng.uniform(0, PAN - abs(vy) * (FRAMES - 1))
    x0 += max(0.0, -vx) * (FRAMES - 1) + SHAKE
    y0 += max(0.0, -vy) * (FRAMES - 1) + SHAKE
    sx, sy = rng.uniform(-SHAKE, SHAKE, (2, FRAMES))
    tops, lefts = (np.rint(start + speed * np.arange(FRAMES) + shake).astype(int)
                   for start, speed, shake in ((y0, vy, sy), (x0, vx, sx)))
    return np.stack([world_rgb[y:y + SIZE, x:x + SIZE] for y, x in zip(tops, lefts)])


def _distractors(rng: random.Random, taken: set) -> list[dict]:
    """2-4 circles or squares of 8-20 px in the distractor colours, static or drifting, off `taken`."""
    shapes = []
    for _ in range(rng.randint(2, 4)):
        size = rng.randint(8, 20)
        drift = (rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6)) if rng.random() < 0.5 else (0.0, 0.0)
        for _attempt in range(50):
            x, y = rng.uniform(0, SIZE - size), rng.uniform(0, SIZE - size)
            ends = [(x + drift[0] * t, y + drift[1] * t) for t in (0, FRAMES - 1)]
            if all(0 <= ex <= SIZE - size and 0 <= ey <= SIZE - size for ex, ey in ends) and not any(
                    _cells(int(ex) - 2, int(ey) - 2, size + 4, size + 4) & taken for ex, ey in ends):
                name = rng.choice(list(DISTRACTORS))
                shapes.append({"x": x, "y": y, "size": size, "drift": drift, "circle": rng.random() < 0.5,
                               "class": class_of("distractor", name), "rgb": DISTRACTORS[name]})
                break
    return shapes


def _paint(frame, labels, mask, rgb, cls) -> None:
    frame[mask] = rgb
    labels[mask] = cls


def _square(x: int, y: int, side: int):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[max(0, y):y + side, max(0, x):x + side] = True
    return mask


def make_clip(rng: random.Random, sides: dict | None = None) -> Clip:
    """One clip; `sides` overrides the objects' sides in cells (training may start larger): a side,
    or a list of sides to draw this clip's from."""
    sides = {kind: rng.choice(side) if isinstance(side, list) else side
             for kind, side in {**SIDES, **(sides or {})}.items()}
    answers = {kind: rng.choice(options) for kind, options in OPTIONS.items()}
    noise = np.random.default_rng(rng.getrandbits(64))
    mover = sides["mover"] * CELL
    path = mover_path(answers["direction"], mover)
    taken = set().union(*(_cells(x, y, mover, mover) for x, y in path))
    flash_at = _place(rng, sides["flash"], taken)
    taken |= _cells(*flash_at, sides["flash"] * CELL, sides["flash"] * CELL)
    small_at = _place(rng, sides["small"], taken)
    taken |= _cells(*small_at, sides["small"] * CELL, sides["small"] * CELL)
    start = rng.randint(0, FRAMES - FLASH_FRAMES)
    frames = _background(noise, PALETTES["background"][answers["background"]])
    labels = np.full((FRAMES, SIZE, SIZE), class_of("background", answers["background"]), np.uint8)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    for shape in _distractors(rng, taken):
        for t in range(FRAMES):
            x, y, r = shape["x"] + shape["drift"][0] * t, shape["y"] + shape["drift"][1] * t, shape["size"] / 2
            if shape["circle"]:
                mask = (xs + 0.5 - x - r) ** 2 + (ys + 0.5 - y - r) ** 2 <= r * r
            else:
                mask = _square(int(round(x)), int(round(y)), shape["size"])
            _paint(frames[t], labels[t], mask, shape["rgb"], shape["class"])
    small_rgb, flash_rgb = PALETTES["small"][answers["small"]], PALETTES["flash"][answers["flash"]]
    for t in range(FRAMES):
        _paint(frames[t], labels[t], _square(*small_at, sides["small"] * CELL), small_rgb,
               class_of("small", answers["small"]))
        if start <= t < start + FLASH_FRAMES:
            _paint(frames[t], labels[t], _square(*flash_at, sides["flash"] * CELL), flash_rgb,
                   class_of("flash", answers["flash"]))
        _paint(frames[t], labels[t], _square(*path[t], mover), MOVER, CLASSES.index("mover"))
    light = 1.0 + rng.uniform(-0.12, 0.12) * (np.arange(FRAMES, dtype=np.float32) / (FRAMES - 1) - 0.5)
    frames = frames * light[:, None, None, None] + noise.normal(0.0, NOISE, frames.shape).astype(np.float32)
    return Clip(np.clip(np.rint(frames), 0, 255).astype(np.uint8), labels, answers, (start, start + FLASH_FRAMES))


def scene_frames(rng: random.Random, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, SIZE, SIZE, 3) frames and their (count, SIZE, SIZE) labels for the vision stage: one
    frame of a random clip each (textured background, distractors, noise), with 2-8 more squares of
    1-3 cells anywhere in any of the classes' colours, so every colour is seen at every place."""
    frames = np.empty((count, SIZE, SIZE, 3), np.uint8)
    labels = np.empty((count, SIZE, SIZE), np.uint8)
    for i in range(count):
        clip = make_clip(rng, {"flash": [1, 2, 3], "small": [1, 2], "mover": [1, 2]})
        t = rng.randrange(FRAMES)
        frame, label = clip.frames[t].astype(np.float32), clip.labels[t].copy()
        for _ in range(rng.randint(2, 8)):
            side = rng.randint(CELL // 2, 3 * CELL)
            x, y = rng.randrange(SIZE - side + 1), rng.randrange(SIZE - side + 1)
            cls = rng.randrange(len(CLASSES))
            _paint(frame, label, _square(x, y, side), COLOURS[cls], cls)
        frames[i] = np.clip(np.rint(frame + np.random.default_rng(rng.getrandbits(64)).normal(
            0.0, NOISE, frame.shape)), 0, 255).astype(np.uint8)
        labels[i] = label
    return round_trip(frames), labels


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
    """Write the test split (`clips` .mp4 files and questions.jsonl with the four questions of each
    clip, video paths relative to it) under `data_dir` unless it is there."""
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
        video = f"videos/clip_{i:04d}.mp4"
        write_clip(data_dir / video, clip.frames, FPS)
        for kind in KINDS:
            text, options, letter = question(kind, clip.answers[kind])
            rows.append({"id": f"clip_{i:04d}_{kind}", "video": video, "kind": kind, "question": text,
                         "options": options, "answer": letter, "answer_text": clip.answers[kind]})
    write_questions(questions, rows)
    # the stamp last: a run cut before it leaves the data to be written anew, never an older
    # questions file under this recipe's stamp
    stamp.write_text(recipe)
    return questions
