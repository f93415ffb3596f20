"""The synthetic task's clips hold the evidence each question kind is about, where the docstring
of harness/data/synthetic.py says, in scenes with the statistics of real video (texture, noise, pan,
distractors); the lmms_eval task asks every question of every clip, exactly what the micro model
learnt; generated data and the trainer are the same from run to run."""

import json
import math
import random

import numpy as np
import pytest

from harness.data import synthetic as synth
from harness.data.video import uniform_indices


def of(clip, group: str, name: str) -> np.ndarray:
    """(F, H, W) bool: where the clip shows that class."""
    return clip.labels == synth.class_of(group, name)


def cells_of(mask: np.ndarray) -> set:
    """The cells (CELL x CELL px) a 2-D mask covers entirely."""
    c = synth.CELL
    return {(x, y) for y in range(synth.GRID) for x in range(synth.GRID)
            if mask[y * c:(y + 1) * c, x * c:(x + 1) * c].all()}


@pytest.mark.parametrize("seed", range(12))
def test_every_clip_holds_the_evidence_of_every_kind(seed):
    clip = synth.make_clip(random.Random(seed))
    answers = clip.answers
    assert of(clip, "background", answers["background"]).mean() > 0.7  # it fills most of the clip
    # the flash: a 2x2-cell square on the cell grid, in exactly FLASH_FRAMES consecutive frames,
    # 1 or 2 of the 8 sampled
    flash = of(clip, "flash", answers["flash"])
    shown = [t for t in range(synth.FRAMES) if flash[t].any()]
    assert shown == list(range(*clip.flash)) and len(shown) == synth.FLASH_FRAMES
    assert all(flash[t].sum() == (2 * synth.CELL) ** 2 and len(cells_of(flash[t])) == 4 for t in shown)
    assert 1 <= len(set(shown) & set(uniform_indices(synth.FRAMES, 8).tolist())) <= 2
    # the small square: one whole cell, the same in every frame
    small = of(clip, "small", answers["small"])
    assert all((m == small[0]).all() for m in small) and small[0].sum() == synth.CELL ** 2
    assert len(cells_of(small[0])) == 1
    # the mover: one whole cell, from the centre towards the answered edge, one step per frame
    mover = clip.labels == synth.CLASSES.index("mover")
    assert all(m.sum() == synth.CELL ** 2 for m in mover)
    centres = np.array([np.argwhere(m).mean(0)[::-1] for m in mover])  # (x, y)
    dx, dy = synth.DIRECTIONS[answers["direction"]]
    assert np.allclose(centres[0], synth.SIZE / 2, atol=1)
    steps = np.diff(centres, axis=0)
    assert (np.sign(steps[:, 0]) == dx).all() and (np.sign(steps[:, 1]) == dy).all()
    # only distractors besides: nothing of another question palette
    present = {synth.CLASSES[c] for c in np.unique(clip.labels)}
    assert present - {f"background:{answers['background']}", f"flash:{answers['flash']}",
                      f"small:{answers['small']}", "mover"} <= {f"distractor:{d}" for d in synth.DISTRACTORS}
    assert any(p.startswith("distractor") for p in present)


def test_scenes_have_the_statistics_of_real_video_not_flat_colours():
    """Texture and sensor noise: no two background pixels alike, neighbours correlated (a falling
    spatial spectrum), the background changing over time (pan, lighting), sensor noise in every
    frame."""
    moved = []
    for seed in range(6):
        clip = synth.make_clip(random.Random(seed))
        background = of(clip, "background", clip.answers["background"])
        luma = clip.frames.astype(float).mean(-1)
        assert luma[background].std() > 5  # textured, not flat (the noise alone: about 2.3)
        horizontal = np.corrcoef(luma[:, :, :-1].ravel(), luma[:, :, 1:].ravel())[0, 1]
        assert horizontal > 0.5  # neighbouring pixels alike, as in natural images
        still = background[0] & background[-1]
        assert np.abs(luma[0][still] - luma[-1][still]).mean() > 2  # pan, lighting drift, noise
        assert np.abs(np.diff(luma[:2], axis=0))[0][still].mean() > 1  # noise even frame to frame
        # the camera moves: in 7-px blocks (the sensor noise averaged out) the same place differs
        # between two sampled frames (two apart); a pan of 8 px without shake gave 0.4-1.4 levels
        blocks = luma.reshape(synth.FRAMES, 16, 7, 16, 7).mean((2, 4))
        clean = background.reshape(synth.FRAMES, 16, 7, 16, 7).all(axis=(2, 4))
        moved.append(np.abs(blocks[0] - blocks[2])[clean[0] & clean[2]].mean())
    assert np.mean(moved) > 2


def test_larger_training_sides_and_drawn_sides():
    clip = synth.make_clip(random.Random(0), {"flash": 3, "small": 2, "mover": 2})
    assert of(clip, "flash", clip.answers["flash"])[clip.flash[0]].sum() == (3 * synth.CELL) ** 2
    assert of(clip, "small", clip.answers["small"])[0].sum() == (2 * synth.CELL) ** 2
    assert (clip.labels[0] == synth.CLASSES.index("mover")).sum() == (2 * synth.CELL) ** 2
    rng = random.Random(1)
    drawn = {int(of(c, "small", c.answers["small"])[0].sum())
             for c in (synth.make_clip(rng, {"small": [1, 2]}) for _ in range(40))}
    assert drawn == {synth.CELL ** 2, (2 * synth.CELL) ** 2}


def test_flash_is_sampled_whatever_its_start():
    sampled = set(uniform_indices(synth.FRAMES, 8).tolist())
    for start in range(synth.FRAMES - synth.FLASH_FRAMES + 1):
        assert 1 <= len(sampled & set(range(start, start + synth.FLASH_FRAMES))) <= 2


@pytest.mark.slow
def test_every_question_of_every_clip_answers_balanced_and_splits_disjoint(tmp_path):
    questions = synth.generate(tmp_path / "data", clips=240)
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    assert len(rows) == 960 and [r["kind"] for r in rows[:4]] == list(synth.KINDS)
    assert len({r["video"] for r in rows}) == 240 and all(not r["video"].startswith("/") for r in rows)
    for kind in synth.KINDS:
        letters = [r["answer"] for r in rows if r["kind"] == kind]
        assert len(letters) == 240 and min(letters.count(x) for x in "ABCD") >= 40  # near uniform
    test_clip = synth.make_clip(random.Random(f"0:{synth.SPLIT_SEEDS['test']}"))
    train_clip = synth.make_clip(synth.TrainSplit(0).rng)
    assert not np.array_equal(test_clip.frames, train_clip.frames)


def test_data_of_another_generator_version_is_written_anew(tmp_path, monkeypatch):
    questions = synth.generate(tmp_path / "data", clips=4)
    first = questions.read_text()
    questions.write_text("stale\n")
    assert synth.generate(tmp_path / "data", clips=4).read_text() == "stale\n"  # same version: kept
    monkeypatch.setattr(synth, "VERSION", synth.VERSION + 1)
    assert synth.generate(tmp_path / "data", clips=4).read_text() == first


def test_the_task_asks_what_the_model_was_trained_on(tmp_path):
    from harness.data.lmms_tasks.vtc_synthetic.utils import doc_to_text, process_results

    rows = [json.loads(line) for line in synth.generate(tmp_path / "data", clips=2).read_text().splitlines()]
    assert [r["kind"] for r in rows] == list(synth.KINDS) * 2
    for row in rows:
        assert doc_to_text(row) == synth.prompt_text(row["kind"])
        assert process_results(row, [row["answer"]]) == {"accuracy": 1.0}
        wrong = next(x for x in "ABCD" if x != row["answer"])
        assert process_results(row, [f" {wrong}."]) == {"accuracy": 0.0}


def test_the_codec_round_trip_keeps_the_colours_and_is_the_same_every_time():
    rng = random.Random(0)
    clips = [synth.make_clip(rng).frames for _ in range(12)]
    back = [synth.round_trip(c) for c in clips]
    assert back[0].shape == clips[0].shape
    # the codec keeps the colours within a few levels (it smooths some of the sensor noise; edges blur
    # with the chroma subsampling)
    assert max(np.median(np.abs(b.astype(int) - c.astype(int))) for b, c in zip(back, clips)) <= 5
    # x264 with its default threads and rate control changed a few pixels of some of these clips
    # from one call to the next; the data must not
    for _ in range(3):
        assert all(np.array_equal(synth.round_trip(c), b) for c, b in zip(clips, back))


@pytest.mark.slow
def test_the_trainer_is_deterministic_for_a_seed(monkeypatch):
    """Two trainings of a shortened recipe give the same weights bit for bit (the full recipe is
    the same code with more steps)."""
    import torch

    from harness.train import micro as train_micro
    from tests.helpers import job_of, make_cfg

    model = job_of(make_cfg("model=micro", "task=synthetic", results_dir="/unused", cache_dir="/unused")).model
    arch, recipe = model.arch, model.train
    monkeypatch.setattr(train_micro, "VALIDATION_CLIPS", 8)  # validation does not train
    recipe["vision"]["steps"] = 4
    recipe["language"].update(lr=2e-3, warmup=2)
    recipe["language"]["stages"] = [{"frames": 2, "steps": 3, "batch": 2, "sides": {"small": [1, 2]}},
                                    {"frames": 8, "steps": 2, "batch": 1, "lr": 1e-3, "warmup": 1}]
    rates = []
    step = train_micro._step
    monkeypatch.setattr(train_micro, "_step", lambda loss, params, optimizer, schedule: (
        rates.append(optimizer.param_groups[0]["lr"]), step(loss, params, optimizer, schedule))[1])
    states = []
    for _ in range(2):
        model, _, report = train_micro.train(arch, recipe, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert [s["frames"] for s in report["language"]] == [2, 8]
    # each language stage warms up from 0 and decays from its own rate (transformers'
    # get_cosine_schedule_with_warmup; the first 4 steps are the vision stage)
    def rate(base, warmup, steps, s):
        return base * s / warmup if s < warmup else base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    assert rates[4:9] == pytest.approx([rate(2e-3, 2, 3, s) for s in range(3)] + [rate(1e-3, 1, 2, s) for s in range(2)])


RECIPE = {"seed": 0, "frames": 8, "vision": {"steps": 1, "batch": 1, "lr": 1e-3, "warmup": 1, "texture": 3.0,
                                             "uniformity": 1.0},
          "language": {"lr": 1e-3, "warmup": 1, "stages": [{"frames": 2, "steps": 1, "batch": 1}]}}


def _set_stage(key, value):
    return lambda r: r["language"]["stages"][0].__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    (_set_stage("frames", 40), r"model.train.language.stages\[0\].frames=40"),
    (_set_stage("sides", {"small": [1, 9]}), r"language.stages\[0\].sides.small"),
    (_set_stage("lr", 0), r"model.train.language.stages\[0\].lr=0: expected a number"),
    (lambda r: r["vision"].pop("lr"), "missing field 'lr'"),
    (lambda r: r["vision"].__setitem__("texture", 0), r"model.train.vision.texture=0: expected a number"),
    (lambda r: r["vision"].__setitem__("uniformity", -1), r"model.train.vision.uniformity=-1"),
])
def test_recipe_errors_name_the_field(edit, message):
    from harness.train.micro import check_recipe

    check_recipe(RECIPE)  # the unedited recipe is valid
    bad = json.loads(json.dumps(RECIPE))
    edit(bad)
    with pytest.raises(ValueError, match=message):
        check_recipe(bad)


def test_the_texture_target_is_what_the_flat_class_colours_leave():
    """A frame painted in its classes' exact colours has no texture (every component 0 after
    standardising); a luminance ramp added to it shows up, per sub-block, in the ramp's order."""
    import torch

    from harness.train.micro import TEXTURE_CELLS, texture_targets

    rng = random.Random(0)
    labels = np.stack([synth.make_clip(rng).labels[0] for _ in range(2)])
    flat = synth.COLOURS[labels]
    assert torch.equal(texture_targets(flat, labels, 8), torch.zeros(2, 64, 3 * TEXTURE_CELLS ** 2))
    ramp = flat + np.linspace(0, 50, synth.SIZE, dtype=np.float32)[None, None, :, None]  # brighter to the right
    target = texture_targets(ramp, labels, 8).view(2, 8, 8, 3, TEXTURE_CELLS, TEXTURE_CELLS)
    left, right = target[..., 0], target[..., 1]  # the sub-blocks' columns within each token
    assert (right > left).all()
    assert (target[:, :, 1:, :, :, 0] > target[:, :, :-1, :, :, 1]).all()  # and across tokens


def test_uniformity_is_zero_for_one_direction_and_minus_four_for_orthogonal_tokens():
    """Wang & Isola's log E exp(-2 |u_i - u_j|^2): identical directions 0, orthogonal ones -4 (the
    squared distance of two orthogonal unit vectors is 2); the scale of a token does not count."""
    import torch

    from harness.train.micro import uniformity

    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert uniformity(same).item() == pytest.approx(0.0, abs=1e-6)
    assert uniformity(5 * torch.eye(4)[None]).item() == pytest.approx(-4.0, abs=1e-6)
