"""The synthetic task's clips hold the evidence each question kind is about, where the docstring
of harness/synthetic_data.py says; the lmms_eval task asks exactly what the micro model learnt;
generated data and the trainer are the same from run to run."""

import json
import math
import random

import numpy as np
import pytest

from harness.data import synthetic as synth
from harness.data.video import uniform_indices


def colour_mask(frame: np.ndarray, rgb) -> np.ndarray:
    return (np.abs(frame.astype(int) - np.array(rgb)).sum(-1) < 30)


def cells_of(mask: np.ndarray) -> set:
    """The cells (CELL x CELL px) a 2-D mask covers entirely."""
    c = synth.CELL
    return {(x, y) for y in range(synth.GRID) for x in range(synth.GRID)
            if mask[y * c:(y + 1) * c, x * c:(x + 1) * c].all()}


@pytest.mark.parametrize("seed", range(12))
def test_every_clip_holds_the_evidence_of_every_kind(seed):
    clip = synth.make_clip(random.Random(seed))
    frames, answers = clip.frames, clip.answers
    background = synth.PALETTES["background"][answers["background"]]
    assert colour_mask(frames, background).mean() > 0.85  # the background fills most of the clip
    # the flash: a 2x2-cell square on the cell grid, in exactly FLASH_FRAMES consecutive frames,
    # 1 or 2 of the 8 sampled
    rgb = synth.PALETTES["flash"][answers["flash"]]
    flash = [t for t in range(synth.FRAMES) if colour_mask(frames[t], rgb).any()]
    assert flash == list(range(*clip.flash)) and len(flash) == synth.FLASH_FRAMES
    assert colour_mask(frames[flash[0]], rgb).sum() == (2 * synth.CELL) ** 2
    assert len(cells_of(colour_mask(frames[flash[0]], rgb))) == 4
    assert 1 <= len(set(flash) & set(uniform_indices(synth.FRAMES, 8).tolist())) <= 2
    # the small square: one whole cell, the same in every frame
    small = [colour_mask(f, synth.PALETTES["small"][answers["small"]]) for f in frames]
    assert all((m == small[0]).all() for m in small) and small[0].sum() == synth.CELL ** 2
    assert len(cells_of(small[0])) == 1
    # the mover: one cell of white, from the centre towards the answered edge, one step per frame
    centres = np.array([np.argwhere(colour_mask(f, synth.MOVER)).mean(0)[::-1] for f in frames])  # (x, y)
    assert all(colour_mask(f, synth.MOVER).sum() == synth.CELL ** 2 for f in frames)
    dx, dy = synth.DIRECTIONS[answers["direction"]]
    assert np.allclose(centres[0], synth.SIZE / 2, atol=1)
    steps = np.diff(centres, axis=0)
    assert (np.sign(steps[:, 0]) == dx).all() and (np.sign(steps[:, 1]) == dy).all()
    edge = centres[-1] - synth.CELL / 2 + 0.5  # top-left corner of the last position
    assert (dx < 0 and edge[0] == 0) or (dx > 0 and edge[0] == synth.SIZE - synth.CELL) or \
           (dy < 0 and edge[1] == 0) or (dy > 0 and edge[1] == synth.SIZE - synth.CELL)
    # nothing covers anything else: each object is whole where it is
    assert not (colour_mask(frames[flash[0]], rgb) & small[0]).any()


def test_larger_training_sides_and_drawn_sides():
    clip = synth.make_clip(random.Random(0), {"flash": 3, "small": 2, "mover": 2})
    rgb = synth.PALETTES["flash"][clip.answers["flash"]]
    assert colour_mask(clip.frames[clip.flash[0]], rgb).sum() == (3 * synth.CELL) ** 2
    assert colour_mask(clip.frames[0], synth.PALETTES["small"][clip.answers["small"]]).sum() == (2 * synth.CELL) ** 2
    assert colour_mask(clip.frames[0], synth.MOVER).sum() == (2 * synth.CELL) ** 2
    rng = random.Random(1)
    drawn = {int(colour_mask(c.frames[0], synth.PALETTES["small"][c.answers["small"]]).sum())
             for c in (synth.make_clip(rng, {"small": [1, 2]}) for _ in range(40))}
    assert drawn == {synth.CELL ** 2, (2 * synth.CELL) ** 2}


def test_flash_is_sampled_whatever_its_start():
    sampled = set(uniform_indices(synth.FRAMES, 8).tolist())
    for start in range(synth.FRAMES - synth.FLASH_FRAMES + 1):
        assert 1 <= len(sampled & set(range(start, start + synth.FLASH_FRAMES))) <= 2


def test_answers_are_balanced_and_splits_disjoint(tmp_path):
    questions = synth.generate(tmp_path / "data", clips=240)
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    assert len(rows) == 240 and [r["kind"] for r in rows[:4]] == list(synth.KINDS)
    for kind in synth.KINDS:
        letters = [r["answer"] for r in rows if r["kind"] == kind]
        assert len(letters) == 60 and min(letters.count(x) for x in "ABCD") >= 8  # near uniform
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

    rows = [json.loads(line) for line in synth.generate(tmp_path / "data", clips=8).read_text().splitlines()]
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
    # flat regions survive H.264 within a few levels; edges blur (chroma subsampling)
    assert max(np.median(np.abs(b.astype(int) - c.astype(int))) for b, c in zip(back, clips)) <= 3
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
    # each language stage warms up and decays from its own rate (the first 4 steps are the vision stage)
    cosine = [0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)]
    assert rates[4:9] == pytest.approx([2e-3 * 0.5 * cosine[0], 2e-3 * cosine[1], 2e-3 * cosine[2], 1e-3, 1e-3 * 0.5])


RECIPE = {"seed": 0, "frames": 8, "vision": {"steps": 1, "batch": 1, "lr": 1e-3, "warmup": 1},
          "language": {"lr": 1e-3, "warmup": 1, "stages": [{"frames": 2, "steps": 1, "batch": 1}]}}


def _set_stage(key, value):
    return lambda r: r["language"]["stages"][0].__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    (_set_stage("frames", 40), r"model.train.language.stages\[0\].frames=40"),
    (_set_stage("sides", {"small": [1, 9]}), r"language.stages\[0\].sides.small"),
    (_set_stage("lr", 0), r"model.train.language.stages\[0\].lr=0: expected a number"),
    (lambda r: r["vision"].pop("lr"), "missing field 'lr'"),
])
def test_recipe_errors_name_the_field(edit, message):
    from harness.train.micro import check_recipe

    check_recipe(RECIPE)  # the unedited recipe is valid
    bad = json.loads(json.dumps(RECIPE))
    edit(bad)
    with pytest.raises(ValueError, match=message):
        check_recipe(bad)
