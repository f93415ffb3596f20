"""Qwen2.5-VL specifics: the video input equals the stock pipeline's (qwen-vl-utils' fetch_video,
lmms_eval's subsampling, transformers' Qwen2VLVideoProcessor), and video tokens keep their M-RoPE
positions (transformers' `get_rope_index`) through visual-stage and LLM-stage compression.

qwen-vl-utils and transformers' video processor import torchvision, which is broken against the CPU
torch of the CI machine: their functions are compiled from their own source files here, and only
torchvision's v1 tensor `resize` is restated (float32 bicubic antialiased interpolation, clamp to
[0, 255], round, back to uint8: `torchvision/transforms/_functional_tensor.py`).
"""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import methods
from harness.models.qwen2_5_vl_video import (
    LMMS_MAX_PIXELS,
    LMMS_MIN_PIXELS,
    frame_indices,
    load_qwen_video,
)
from methods.core import decoder
from methods.core.base import VideoTokens
from methods.core.decoder import Keep
from tests.helpers import write_natural_video
from tests.helpers.qwen_vl import compile_source, qwen_vl_utils_namespace
from tests.helpers.tolerance import close

QUESTION = "What colour is the moving square?\nA. red\nB. blue"
TOLERANCE = 0.0  # max abs difference of the patches: the same float32 operations in the same order


@pytest.fixture(scope="module")
def qwen_vl_utils():
    return qwen_vl_utils_namespace()


@pytest.fixture(scope="module")
def processor():
    import transformers

    origin = str(Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py")
    tree = ast.parse(Path(origin).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    patchify = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    ns = compile_source(origin, {"smart_resize"}, {"torch": torch, "math": __import__("math")}, drop_imports=None)
    patchify.decorator_list = []
    exec(compile(ast.Module(body=[patchify], type_ignores=[]), origin, "exec"), ns)
    return ns


def stock_pipeline(path, max_num_frames, qwen_vl_utils, processor, pre):
    """lmms_eval's qwen2_5_vl generate_until on one video: fetch_video, its subsampling, the processor."""
    ele = {"type": "video", "video": str(path), "max_pixels": LMMS_MAX_PIXELS, "min_pixels": LMMS_MIN_PIXELS}
    video, sample_fps = qwen_vl_utils["fetch_video"](ele, return_video_sample_fps=True)
    total_frames = video.shape[0]  # lmms_eval/models/simple/qwen2_5_vl.py, as written there
    indices = np.linspace(0, total_frames - 1, max_num_frames, dtype=int)
    indices = np.unique(indices)
    if total_frames - 1 not in indices:
        indices = np.unique(np.append(indices, total_frames - 1))
    video = video[indices]
    height, width = video.shape[-2:]  # the processor's resize: the same size, so the identity
    assert processor["smart_resize"](height, width, factor=28, min_pixels=LMMS_MIN_PIXELS,
                                     max_pixels=LMMS_MAX_PIXELS) == (height, width)
    mean = torch.tensor(pre.mean) * (1.0 / pre.rescale)
    std = torch.tensor(pre.std) * (1.0 / pre.rescale)
    video = (video.to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    patches, t, gh, gw = processor["patchify"](None, video[None], 14, 2, 2)
    return patches[0], (t, gh, gw)


@pytest.fixture(scope="module")
def odd_video(tmp_path_factory):
    """A 200x120 clip (not a multiple of 28, landscape), 30 frames at 10 fps: odd frame counts."""
    return write_natural_video(tmp_path_factory.mktemp("video") / "odd.mp4", 200, 120, 30, fps=10, seed=1)


@pytest.mark.parametrize("frames", [4, 5, 32])
def test_the_video_input_equals_lmms_evals_pipeline(qwen, qwen_vl_utils, processor, odd_video, smoke_questions, frames):
    for path in (odd_video, smoke_questions.parent / "videos" / "clip_002.mp4"):
        ours = load_qwen_video(path, frames, qwen.preprocessing)
        patches, grid = stock_pipeline(path, frames, qwen_vl_utils, processor, qwen.preprocessing)
        assert ours.grid_thw == grid
        assert ours.pixels.shape == patches.shape
        assert float((ours.pixels - patches).abs().max()) <= TOLERANCE


def test_frame_sampling_is_qwen_vl_utils_then_lmms_eval(qwen_vl_utils):
    for total, fps, count in [(16, 8.0, 8), (300, 30.0, 32), (31, 10.0, 5), (3, 1.0, 8), (1000, 24.0, 16)]:
        n = qwen_vl_utils["smart_nframes"]({}, total_frames=total, video_fps=fps)
        fetched = torch.linspace(0, total - 1, n).round().long().numpy()
        keep = np.unique(np.linspace(0, n - 1, count, dtype=int))
        if n - 1 not in keep:
            keep = np.unique(np.append(keep, n - 1))
        indices, fetched_count = frame_indices(total, fps, count)
        assert fetched_count == n and indices.tolist() == fetched[keep].tolist()


def test_the_frame_size_is_qwen_vl_utils_budget(qwen, qwen_vl_utils):
    pre = qwen.preprocessing
    for h, w, n in [(96, 96, 4), (1080, 1920, 64), (120, 200, 600), (480, 640, 768)]:
        total = qwen_vl_utils["MODEL_SEQ_LEN"] * 28 * 28 * 0.9
        budget = max(min(768 * 28 * 28, total / n * 2), int(LMMS_MIN_PIXELS * 1.05))
        expected = qwen_vl_utils["smart_resize"](h, w, factor=28, min_pixels=LMMS_MIN_PIXELS,
                                                 max_pixels=min(LMMS_MAX_PIXELS, budget))
        assert pre.frame_size(h, w, n) == expected


def rope_positions(qwen, ids, encoded):
    """transformers' get_rope_index for the uncompressed prompt of `encoded`."""
    where = ids.index(qwen.video_token_id)
    t, n = encoded.visual.features.shape[:2]
    h, w = encoded.visual.grid
    full = torch.tensor([ids[:where] + [qwen.video_token_id] * (t * n) + ids[where + 1:]])
    spg = encoded.extras["time_interval"] / qwen.vision.tokens_per_second
    positions, deltas = qwen.model.model.get_rope_index(
        full, (full == qwen.video_token_id).int() * 2, video_grid_thw=torch.tensor([[t, 2 * h, 2 * w]]),
        second_per_grid_ts=spg[None])
    return positions, deltas, where


@pytest.fixture(scope="module")
def clip(qwen, smoke_questions):
    return qwen.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), 8)


def test_visual_stage_tokens_keep_their_mrope_positions(qwen, clip):
    """FastVID and PruneVid hand over VideoTokens: each keeps the (t, h, w) of the token it kept,
    the text after the video sits where it would uncompressed."""
    ids, _ = qwen.prompt_ids(QUESTION)
    for name, knobs in (("fastvid", {"retention": 0.25}), ("prunevid", {"tau": 1.0})):
        compressor = methods.build(name, **knobs)
        encoded = qwen.encode_video(clip, compressor.needs)
        tokens = compressor.compress(encoded.visual)
        assert isinstance(tokens, VideoTokens)
        prompt = qwen.prepare(encoded, compressor, ids)
        full, _, where = rope_positions(qwen, ids, encoded)
        start, end = prompt.span
        n_full = encoded.visual.features.shape[0] * encoded.visual.features.shape[1]
        assert end - start == len(tokens.positions) < n_full
        assert torch.equal(prompt.positions[..., start:end], full[..., where + tokens.positions])
        assert torch.equal(prompt.positions[..., :start], full[..., :where])
        assert torch.equal(prompt.positions[..., end:], full[..., where + n_full:])


class Probe:
    """Before layer 2 keep every third video token; before layer 5 record what the sequence holds."""

    layers = (2, 5)

    def __init__(self):
        self.seen = None

    def act(self, view):
        if view.layer == 2:
            return Keep(torch.arange(0, len(view.video), 3))
        self.seen = (view.positions.clone(), view.origin.clone(), view.video_index.clone())
        return None

    def planned(self, video_tokens, groups=None):
        return None


def test_llm_stage_keeps_each_kept_tokens_mrope_position(qwen, clip):
    ids, _ = qwen.prompt_ids(QUESTION)
    none = methods.build("none")
    prompt = qwen.prepare(clip, none, ids)
    encoded = qwen.encode_video(clip)
    full, deltas, where = rope_positions(qwen, ids, encoded)
    assert torch.equal(prompt.positions, full)
    probe = Probe()
    out = decoder.prefill(qwen.llm, prompt.embeds, prompt.positions, prompt.span, probe,
                          video_index=prompt.video_index, frame_tokens=prompt.run.frame_tokens)
    positions, origin, index = probe.seen
    assert torch.equal(positions, full[..., origin])  # every entry at its original (t, h, w)
    assert torch.equal(index, torch.arange(0, prompt.span[1] - prompt.span[0], 3))
    assert out.layer_video_tokens[5] == len(index) < out.layer_video_tokens[0]
    # decoding continues where the stock model's does: after the largest position (rope_deltas)
    assert out.state.next_position.flatten().tolist() == [full.shape[-1] + int(deltas)] * 3


def test_patch_scores_come_in_row_major_patch_order(qwen, clip):
    """The vision blocks see patches in window order; the scores are handed over row-major: mapping
    the blocks' own rotary coordinates through the same order gives the row-major (row, column) grid."""
    from transformers.vision_utils import (
        get_vision_position_ids,
        get_vision_window_index,
    )

    grid_thw = torch.tensor([clip.grid_thw])
    t, gh, gw = clip.grid_thw
    coords = get_vision_position_ids(grid_thw, 2)  # (P, 2) in the processor's patch order
    window, _ = get_vision_window_index(grid_thw, 2, qwen.vision.window_size, 14)
    in_blocks = coords.view(-1, 4, 2)[window].reshape(-1, 2)  # as the blocks see them
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    expected = torch.stack([rows, cols], -1).reshape(-1, 2).repeat(t, 1)
    assert torch.equal(in_blocks[qwen.row_major(grid_thw)], expected)
    visual = qwen.encode_video(clip, frozenset({"patch_scores"})).visual
    assert visual.patch_grid == (gh, gw) and visual.patch_scores.shape == (t, gh * gw)
    # the last block is a full-attention block: each temporal patch's received attention sums to 1
    # (float32: softmax rows over at most all t * gh * gw patches, their mean over heads and
    # queries, the sum)
    torch.testing.assert_close(visual.patch_scores.sum(-1), torch.ones(t), **close(torch.float32, t * gh * gw, depth=3))


def test_random_weights_build_the_published_shapes(tmp_path):
    import yaml

    from harness.models.qwen2_5_vl import Qwen2_5_VL
    from harness.models.random_weights import random_model_dir
    from tests.helpers import CONF

    for name, tied in (("qwen2_5_vl_3b", True), ("qwen2_5_vl_7b", False)):
        arch = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())["arch"]
        config = Qwen2_5_VL.config_from_arch(arch, Qwen2_5_VL.offline_tokenizer())
        text, vision = config.text_config, config.vision_config
        assert config.tie_word_embeddings is tied
        assert vision.out_hidden_size == text.hidden_size and vision.fullatt_block_indexes == [7, 15, 23, 31]
        assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    arch = yaml.safe_load((CONF / "model" / "qwen2_5_vl_3b.yaml").read_text())["arch"]
    arch["text_config"]["mrope_section"] = [16, 24, 16]
    with pytest.raises(ValueError, match="mrope_section"):
        random_model_dir(tmp_path, "bad", arch, 0, family="qwen2_5_vl")


def test_a_published_flat_config_is_checked_before_loading(tmp_path):
    """Qwen/Qwen2.5-VL-*-Instruct keep the decoder's fields at the top of config.json."""
    import json

    from harness.errors import ConfigError
    from harness.run.validate import check_method_fits, read_model_config

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "vision_config": {"depth": 32, "out_hidden_size": 2048}}))
    config = read_model_config(str(tmp_path))
    check_method_fits(methods.build("fastv", K=35), config)
    with pytest.raises(ConfigError, match=r"fastv.K=36: expected a layer in \[1, 35\]"):
        check_method_fits(methods.build("fastv", K=36), config)
