"""Qwen3-VL specifics: the video input and the prompt equal the stock pipeline's (qwen-vl-utils'
fetch_video as lmms_eval's qwen3_vl model calls it, transformers' Qwen3VLVideoProcessor and
Qwen3VLProcessor), the positions equal transformers' `get_rope_index`, the timestamps between frames
stay text, and the DeepStack features follow every compressor's tokens (or the method is refused in
one line).

qwen-vl-utils imports torchvision, which is broken against the CPU torch of the CI machine: its
functions are compiled from its own source file here, and only torchvision's v1 tensor `resize` is
restated (float32 bicubic antialiased interpolation, clamp to [0, 255], round, back to uint8:
`torchvision/transforms/_functional_tensor.py`). lmms_eval's qwen3_vl module is read from its source
too (importing it takes tens of seconds); transformers' processor functions are called directly
(their methods need no torchvision), its fused rescale-and-normalise is restated
(`TorchvisionBackend.rescale_and_normalize`: mean and std times 1/rescale_factor, then (x - mean) / std
in float32).
"""

import ast
import importlib.util
import json
import types
from functools import partial
from pathlib import Path

import pytest
import torch

import methods
from harness.errors import ConfigError
from harness.models.qwen3_vl_deepstack import (
    WIDEN,
    DeepStackTokens,
    ReplayError,
    replay,
    widened,
)
from harness.models.qwen3_vl_video import (
    LMMS_MAX_PIXELS,
    LMMS_MIN_PIXELS,
    LMMS_SYSTEM_PROMPT,
    frame_indices,
    load_qwen3_video,
)
from harness.run.validate import check_method_family
from methods.core import decoder
from methods.core.base import Compressor, VideoTokens
from methods.core.decoder import Keep
from tests.helpers import CONF, harness, write_natural_video
from tests.helpers.qwen_vl import qwen_vl_utils_namespace
from tests.helpers.tolerance import close

QUESTION = "What colour is the moving square?\nA. red\nB. blue"
TOLERANCE = 0.0  # max abs difference of the patches: the same float32 operations in the same order


@pytest.fixture(scope="module")
def qwen_vl_utils():
    return qwen_vl_utils_namespace()


@pytest.fixture(scope="module")
def lmms():
    """lmms_eval's qwen3_vl model read from its source: its constructor's defaults, its
    `_build_video_kwargs`, and the keywords of its process_vision_info call."""
    origin = importlib.util.find_spec("lmms_eval").submodule_search_locations[0] + "/models/simple/qwen3_vl.py"
    tree = ast.parse(Path(origin).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen3_VL")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args.args[-len(init.args.defaults):]
    defaults = {a.arg: eval(compile(ast.Expression(d), origin, "eval"), {}) for a, d in zip(args, init.args.defaults)}
    build = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_build_video_kwargs")
    ns: dict = {}
    exec(compile(ast.Module(body=[build], type_ignores=[]), origin, "exec"), ns)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "process_vision_info")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    return types.SimpleNamespace(defaults=defaults, build_video_kwargs=ns["_build_video_kwargs"], vision_info=keywords)


def processor_placeholder(grid_thw, metadata: dict) -> str:
    """`Qwen3VLProcessor.replace_video_token` on one video (merge size and temporal patch size 2)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    fake = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
                                 vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                                 video_token="<|video_pad|>")
    fake._calculate_timestamps = partial(Qwen3VLProcessor._calculate_timestamps, fake)
    inputs = {"video_grid_thw": torch.tensor([grid_thw]), "video_metadata": [VideoMetadata(**metadata)]}
    return Qwen3VLProcessor.replace_video_token(fake, inputs, 0)


def stock_pipeline(path, max_num_frames, qwen_vl_utils, lmms, pre):
    """lmms_eval's qwen3_vl on one video: its video kwargs, fetch_video, the processor."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )

    options = types.SimpleNamespace(min_pixels=lmms.defaults["min_pixels"], max_pixels=lmms.defaults["max_pixels"],
                                    fps=None, total_pixels=None, max_num_frames=max_num_frames)
    kwargs = lmms.build_video_kwargs(options)
    import decord

    kwargs["nframes"] = min(kwargs["nframes"], len(decord.VideoReader(str(path))))  # as lmms_eval caps it
    ele = {"type": "video", "video": str(path), **kwargs}
    (video, metadata), _ = qwen_vl_utils["fetch_video"](ele, image_patch_size=lmms.vision_info["image_patch_size"],
                                                        return_video_sample_fps=True, return_video_metadata=True)
    mean = torch.tensor(pre.mean) * (1.0 / pre.rescale)
    std = torch.tensor(pre.std) * (1.0 / pre.rescale)
    video = (video.to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(None, video[None], patch_size=16, merge_size=2,
                                                       temporal_patch_size=2)
    return patches[0], (t, gh, gw), processor_placeholder((t, gh, gw), metadata)


@pytest.fixture(scope="module")
def odd_video(tmp_path_factory):
    """A 200x120 clip (not a multiple of 32, landscape), 30 frames at 10 fps."""
    return write_natural_video(tmp_path_factory.mktemp("video") / "odd.mp4", 200, 120, 30, fps=10, seed=1)


def test_lmms_evals_settings_are_the_harness_defaults(lmms):
    assert lmms.defaults["min_pixels"] == LMMS_MIN_PIXELS and lmms.defaults["max_pixels"] == LMMS_MAX_PIXELS
    assert lmms.defaults["system_prompt"] == LMMS_SYSTEM_PROMPT
    assert lmms.defaults["fps"] is None and lmms.defaults["total_pixels"] is None
    assert lmms.vision_info == {"return_video_kwargs": True, "image_patch_size": 16, "return_video_metadata": True}


@pytest.mark.parametrize("frames", [4, 5, 8])
def test_the_video_input_equals_lmms_evals_pipeline(qwen3, qwen_vl_utils, lmms, odd_video, smoke_questions, frames):
    for path in (odd_video, smoke_questions.parent / "videos" / "clip_002.mp4"):
        ours = load_qwen3_video(path, frames, qwen3.preprocessing)
        patches, grid, placeholder = stock_pipeline(path, frames, qwen_vl_utils, lmms, qwen3.preprocessing)
        assert ours.grid_thw == grid
        assert ours.pixels.shape == patches.shape
        assert float((ours.pixels - patches).abs().max()) <= TOLERANCE
        per_frame = grid[1] * grid[2] // 4
        ours_text = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
                            for s in ours.timestamps)
        assert ours_text == placeholder


def test_frame_sampling_is_qwen_vl_utils_with_lmms_evals_count(qwen_vl_utils):
    from harness.data.video import VideoError

    for total, frames in [(16, 8), (300, 32), (31, 5), (4, 8), (1000, 16), (7, 3)]:
        nframes = min(frames, total)
        n = qwen_vl_utils["smart_nframes"]({"nframes": nframes}, total_frames=total, video_fps=25.0)
        expected = torch.linspace(0, total - 1, n).round().long().numpy()
        assert frame_indices(total, frames).tolist() == expected.tolist()
    for total, frames in [(31, 32), (1, 8)]:  # an odd count rounds past the file (or to none): refused
        with pytest.raises(ValueError):
            qwen_vl_utils["smart_nframes"]({"nframes": min(frames, total)}, total_frames=total, video_fps=25.0)
        with pytest.raises(VideoError, match="cannot be sampled as lmms_eval's qwen3_vl does"):
            frame_indices(total, frames)


def test_the_frame_size_is_qwen_vl_utils_budget(qwen3, qwen_vl_utils):
    pre = qwen3.preprocessing
    for h, w, n in [(96, 96, 4), (1080, 1920, 32), (120, 200, 600), (480, 640, 768)]:
        total = qwen_vl_utils["MODEL_SEQ_LEN"] * 32 * 32 * 0.9
        budget = max(min(768 * 32 * 32, total / n * 2), int(LMMS_MIN_PIXELS * 1.05))
        expected = qwen_vl_utils["smart_resize"](h, w, factor=32, min_pixels=LMMS_MIN_PIXELS,
                                                 max_pixels=min(LMMS_MAX_PIXELS, budget))
        assert pre.frame_size(h, w, n) == expected


@pytest.fixture(scope="module")
def clip(qwen3, smoke_questions):
    return qwen3.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), 8)


@pytest.fixture(scope="module")
def encoded(qwen3, clip):
    return qwen3.encode_video(clip, frozenset({"patch_scores"}))


def stock_prompt_ids(qwen3, question, clip):
    """The processor's prompt as lmms_eval builds it: the chat template on its messages (system
    prompt, the video, the question), the placeholder replaced, the whole text tokenized."""
    messages = [{"role": "system", "content": LMMS_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": question}]}]
    text = qwen3.tokenizer.apply_chat_template(messages, chat_template=qwen3.chat_template, tokenize=False,
                                               add_generation_prompt=True)
    per_frame = clip.grid_thw[1] * clip.grid_thw[2] // 4
    placeholder = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
                          for s in clip.timestamps)
    return qwen3.tokenizer(text.replace("<|video_pad|>", placeholder, 1), add_special_tokens=False).input_ids


def test_the_prompt_and_its_positions_are_the_processors_and_get_rope_index(qwen3, clip, encoded, smoke_questions):
    ids, _ = qwen3.prompt_ids(QUESTION)
    none = methods.build("none")
    prompt = qwen3.prepare(encoded, none, ids)
    layout, _, is_video = qwen3.layout(ids, qwen3.compress(encoded, none).tokens, encoded)
    stock = stock_prompt_ids(qwen3, QUESTION, clip)
    assert layout == stock
    full = torch.tensor([stock])
    positions, deltas = qwen3.model.model.get_rope_index(full, (full == qwen3.video_token_id).int() * 2,
                                                        video_grid_thw=torch.tensor([clip.grid_thw]))
    assert torch.equal(prompt.positions, positions)
    # the span runs from the first video token to the last; the timestamps and markers between the
    # frames are text inside it
    start, end = prompt.span
    assert torch.equal(prompt.video_mask, is_video[start:end]) and not bool(prompt.video_mask.all())
    n = encoded.visual.features.shape[0] * encoded.visual.features.shape[1]
    assert prompt.run.video_tokens_out == n == int(is_video.sum())
    assert prompt.run.text_tokens == len(stock) - n == qwen3.text_tokens(ids, clip) == qwen3.text_tokens(ids, encoded)
    # what calibration and the bench count for FLOPs matching, from the file without decoding it
    assert qwen3.text_tokens(ids, (str(smoke_questions.parent / "videos" / "clip_005.mp4"), 8)) == len(stock) - n
    out = qwen3.prefill(prompt, none, use_cache=True)
    assert out.layer_video_tokens == [n] * qwen3.llm_shape.layers
    # decoding continues where the stock model's does: after the largest position (rope_deltas)
    assert out.state.next_position.flatten().tolist() == [len(stock) + int(deltas)] * 3


def test_none_equals_the_stock_model(qwen3, clip, encoded):
    """`none` through the harness (its prompt layout, M-RoPE positions, DeepStack added by the shared
    driver) gives the logits of the stock Qwen3VLForConditionalGeneration on the processor's prompt
    and pixels (its own vision tower, get_rope_index and _deepstack_process): exactly, since both run
    the same layers on the same inputs in the same order."""
    none = methods.build("none")
    ids, _ = qwen3.prompt_ids(QUESTION)
    ours = qwen3.prefill(qwen3.prepare(encoded, none, ids), none, use_cache=False).logits
    stock_ids = torch.tensor([stock_prompt_ids(qwen3, QUESTION, clip)])
    with torch.no_grad():
        stock = qwen3.model(input_ids=stock_ids, pixel_values_videos=clip.pixels,
                            video_grid_thw=torch.tensor([clip.grid_thw]),
                            mm_token_type_ids=(stock_ids == qwen3.video_token_id).int() * 2, use_cache=False).logits
    assert ours.shape == stock.shape
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


class DropFrame(Compressor):
    """Keeps every other token of every frame but the first, at their own positions (test double)."""

    name = "drop_frame"
    stages = frozenset({"visual"})

    def compress(self, x):
        n = x.features.shape[1]
        keep = torch.arange(n, x.features.shape[0] * n, 2)
        return VideoTokens(x.features.flatten(0, 1)[keep], keep)


def test_kept_tokens_keep_their_positions_and_an_emptied_frame_its_timestamp(qwen3, clip, encoded):
    ids, _ = qwen3.prompt_ids(QUESTION)
    none = methods.build("none")
    full_layout, full_positions, full_video = qwen3.layout(ids, qwen3.compress(encoded, none).tokens, encoded)
    prompt = qwen3.prepare(encoded, DropFrame(), ids)
    tokens = qwen3.compress(encoded, DropFrame()).tokens
    layout, positions, is_video = qwen3.layout(ids, tokens, encoded)
    # every text entry of the full layout is still there, in order, at its position; the kept
    # video tokens take the positions of the input tokens they are
    video_index = torch.cumsum(full_video, 0) - 1
    kept = ~full_video | (full_video & torch.isin(video_index, tokens.positions))
    assert layout == [t for t, k in zip(full_layout, kept.tolist()) if k]
    assert torch.equal(positions, full_positions[:, kept]) and torch.equal(prompt.positions[:, 0], positions)
    # the first frame lost all its tokens: its timestamp, <|vision_start|><|vision_end|> remain
    where = ids.index(qwen3.video_token_id)
    stamp = list(qwen3.stamp_ids(clip.timestamps[0]))
    vs, ve = qwen3.config.vision_start_token_id, qwen3.config.vision_end_token_id
    assert layout[where:where + len(stamp) + 2] == stamp + [vs, ve]
    assert prompt.run.video_tokens_out == len(tokens.positions) == int(is_video.sum())


def test_a_plain_output_sits_in_the_segments_of_its_frames_at_consecutive_positions(qwen3, encoded):
    ids, _ = qwen3.prompt_ids(QUESTION)
    uniform = methods.build("uniform", retention=0.25)
    tokens = qwen3.compress(encoded, uniform).tokens
    assert not tokens.original and tokens.carried == "forward AD"
    frames = encoded.visual.features.shape[0]
    per = len(tokens.frames) // frames  # uniform pools each frame on its own
    assert tokens.frames.tolist() == [f for f in range(frames) for _ in range(per)]
    prompt = qwen3.prompt(qwen3.compress(encoded, uniform), ids)
    assert torch.equal(prompt.positions, torch.arange(prompt.embeds.shape[1]).expand(3, 1, -1))
    layout, _, _ = qwen3.layout(ids, tokens, encoded)
    vs = qwen3.config.vision_start_token_id
    starts = [i for i, t in enumerate(layout) if t == vs][1:]  # the template's own comes first
    assert [layout[s + 1:s + 1 + per] for s in starts] == [[qwen3.video_token_id] * per] * frames


def test_patch_scores_come_in_row_major_patch_order(qwen3, clip, encoded):
    """The vision blocks see patches in the processor's order (2x2 blocks); the scores are handed
    over row-major: mapping the blocks' own rotary coordinates through the order gives the grid."""
    from transformers.vision_utils import get_vision_position_ids

    t, gh, gw = clip.grid_thw
    coords = get_vision_position_ids(torch.tensor([clip.grid_thw]), 2)  # (P, 2) in the blocks' order
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    expected = torch.stack([rows, cols], -1).reshape(-1, 2).repeat(t, 1)
    assert torch.equal(coords[qwen3.row_major(clip.grid_thw)], expected)
    visual = encoded.visual
    assert visual.patch_grid == (gh, gw) and visual.patch_scores.shape == (t, gh * gw)
    # full attention within each temporal patch: its received attention sums to 1
    torch.testing.assert_close(visual.patch_scores.sum(-1), torch.ones(t), **close(torch.float32, gh * gw, depth=3))


def test_the_deepstack_features_are_the_stock_vision_towers(qwen3, clip, encoded):
    with torch.no_grad():
        out = qwen3.model.model.get_video_features(pixel_values_videos=clip.pixels,
                                                  video_grid_thw=torch.tensor([clip.grid_thw]))
    levels = torch.stack([level[0] for level in out.deepstack_features])
    assert torch.equal(encoded.extras["deepstack"].flatten(1, 2), levels)
    assert torch.equal(encoded.visual.features.flatten(0, 1), out.pooler_output[0])
    assert encoded.extras["deepstack"].shape[0] == qwen3.levels == 3


# ---- DeepStack through every visual stage ------------------------------------------------------------
KNOBS = {"prunevid": {"tau": 1.0}}
VISUAL = [n for n in methods.known() if methods.REGISTRY[n].stages and "visual" in methods.REGISTRY[n].stages
          and n != "none"]


def visual_of(qwen3, encoded, compressor):
    visual = encoded.visual
    if "question" in compressor.needs:
        from dataclasses import replace

        visual = replace(visual, question=qwen3.question_embeddings(QUESTION))
    return visual


@pytest.mark.parametrize("name", VISUAL)
def test_deepstack_follows_every_visual_stage(qwen3, encoded, name):
    """Replaying with tangent = the features reproduces the output (the stage is linear once its
    decisions are made); a kept or selected token's DeepStack features are the stock model's at its
    position, and so are those of any output token that is exactly one input token; a merged token's
    features from the forward-mode replay equal those the other mechanism (the widened replay) gives,
    where the stage runs on widened features; the prompt hands the driver one feature row per video
    token."""
    compressor = methods.build(name, **KNOBS.get(name, {}))
    try:
        check_method_family(compressor, "qwen3_vl", json.loads((qwen3.directory / "config.json").read_text()))
    except ConfigError as err:  # refused in one line before anything loads
        assert "\n" not in str(err) and "qwen3_vl" in str(err)
        return
    visual = visual_of(qwen3, encoded, compressor)
    out = compressor.compress(visual)
    expected = out.tokens if isinstance(out, VideoTokens) else out
    tokens = qwen3.compress(encoded, compressor, QUESTION).tokens
    assert isinstance(tokens, DeepStackTokens) and tokens.deepstack.shape[:2] == (3, len(tokens.tokens))
    levels = encoded.extras["deepstack"].flatten(1, 2)
    flat = visual.features.flatten(0, 1)
    n = visual.features.shape[1]
    # weighted means of up to F*N rows, computed twice in float32 (in another order, or on wider rows)
    tolerance = close(torch.float32, flat.shape[0], depth=2)
    if tokens.carried in ("kept", "selected"):  # each token is an input token: its own features
        index = tokens.positions if tokens.carried == "kept" else (
            (flat[None] == tokens.tokens[:, None]).all(-1).float().argmax(1))
        assert torch.equal(tokens.tokens, flat[index]) and torch.equal(tokens.deepstack, levels[:, index])
        assert torch.equal(tokens.frames, index // n)
    elif tokens.carried == "forward AD":
        _, (linear,) = replay(compressor, visual, [visual.features])
        torch.testing.assert_close(linear, expected, **close(torch.float32, flat.shape[0]))
        try:
            wide_tokens, wide = widened(compressor, visual, list(encoded.extras["deepstack"]))
        except ReplayError:  # (a stage that relates the features to the question's embeddings)
            wide = None
        if wide is not None and torch.allclose(wide_tokens, expected, **tolerance):  # the same decisions
            # the harness's tokens are the stage's, placed frame by frame: their rows in its output
            order = (tokens.tokens[:, None] == expected[None]).all(-1).float().argmax(1)
            assert torch.equal(tokens.tokens, expected[order])
            torch.testing.assert_close(tokens.deepstack, torch.stack(wide)[:, order], **tolerance)
    else:
        assert tokens.carried == "widened"
        _, (linear,) = widened(compressor, visual, [visual.features])
        torch.testing.assert_close(linear, expected, **close(torch.float32, flat.shape[0]))
    # an output token that is exactly one input token (a kept one among merged ones) has its features
    same = (tokens.tokens[:, None] == flat[None]).all(-1)
    single = same.sum(1) == 1
    torch.testing.assert_close(tokens.deepstack[:, single], levels[:, same.float().argmax(1)[single]], **tolerance)
    if isinstance(out, VideoTokens) and tokens.carried != "kept":  # merged into kept positions:
        assert torch.equal(tokens.positions, out.positions)  # frames from their positions
        assert torch.equal(tokens.frames, out.positions // n)
    ids, _ = qwen3.prompt_ids(QUESTION)
    prompt = qwen3.prompt(qwen3.compress(encoded, compressor, QUESTION), ids)
    assert [tuple(level.shape) for level in prompt.deepstack] == [tuple(tokens.tokens.shape)] * 3
    assert prompt.run.video_tokens_out == int(prompt.video_mask.sum()) == len(tokens.tokens)


def bilinear(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=False (half-pixel
    centres, sources clamped at 0), written out."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        w[i, lo] += 1 - (src - lo)
        w[i, hi] += src - lo
    return w


def test_uniforms_merged_tokens_carry_their_bilinear_mean_by_hand(qwen3, encoded):
    from methods.uniform import target_grid

    tokens = qwen3.compress(encoded, methods.build("uniform", retention=0.25)).tokens
    frames, _, dim = encoded.visual.features.shape
    h, w = encoded.visual.grid
    rows, cols = target_grid(0.25, h, w)
    wr, wc = bilinear(h, rows), bilinear(w, cols)
    levels = encoded.extras["deepstack"].double().view(3, frames, h, w, dim)
    expected = torch.einsum("ri,cj,lfijd->lfrcd", wr, wc, levels).reshape(3, frames * rows * cols, dim)
    # weighted means of at most 4 rows of the grid, in float32 against float64
    torch.testing.assert_close(tokens.deepstack.double(), expected, **close(torch.float32, 4, depth=2))


def test_scissors_merged_tokens_carry_their_weighted_mean_by_hand(qwen3, encoded):
    """Scissor's output token j is (its temporal representative + the tokens assigned to it) /
    (their count + 1), the representative the mean of its spatial components' means: the same
    weights, rebuilt from its components, on the DeepStack features."""
    from methods.core.similarity import unit_rows
    from methods.scissor import _scc

    scissor = methods.build("scissor", tau=0.8)
    tokens = qwen3.compress(encoded, scissor).tokens
    x = encoded.visual.features
    frames, n, dim = x.shape
    flat = x.flatten(0, 1)
    generator = torch.Generator().manual_seed(scissor.seed)
    units = unit_rows(x)
    comp, k = _scc(units, scissor.tau, scissor.epsilon, generator)
    spatial = torch.zeros(k, frames * n, dtype=torch.float64)
    spatial[comp, torch.arange(frames * n)] = 1.0
    spatial /= spatial.sum(1, keepdim=True)  # each spatial component's mean
    reps = (spatial @ flat.double()).float()
    comp_t, m = _scc(unit_rows(reps)[None], scissor.tau, scissor.epsilon, generator)
    temporal = torch.zeros(m, k, dtype=torch.float64)
    temporal[comp_t, torch.arange(k)] = 1.0
    temporal /= temporal.sum(1, keepdim=True)
    merged = (temporal @ spatial @ flat.double()).float()
    assign = (units.reshape(-1, dim) @ unit_rows(merged).T).argmax(1)
    member = torch.zeros(m, frames * n, dtype=torch.float64)
    member[assign, torch.arange(frames * n)] = 1.0
    weights = (temporal @ spatial + member) / (member.sum(1, keepdim=True) + 1)
    assert 1 < m < frames * n  # some tokens merged, not all
    frame_of = torch.arange(frames, dtype=torch.float64).repeat_interleave(n)
    frame = torch.floor(weights @ frame_of / weights.sum(1) + 0.5 - 1e-3)  # halves to the earlier frame
    order = torch.argsort(frame, stable=True)
    assert torch.equal(tokens.frames, frame[order].long())
    expected = torch.einsum("mi,lid->lmd", weights[order], encoded.extras["deepstack"].flatten(1, 2).double())
    # weighted means of up to F*N rows, float32 against float64
    torch.testing.assert_close(tokens.deepstack.double(), expected, **close(torch.float32, frames * n, depth=2))
    torch.testing.assert_close(tokens.tokens.double(), weights[order] @ flat.double(),
                               **close(torch.float32, frames * n, depth=2))


def test_a_stage_that_is_not_a_fixed_weighted_mean_is_refused(qwen3, encoded):
    class Normalised(Compressor):
        """Tokens divided by their norm (not linear in the features)."""

        name = "normalised"
        stages = frozenset({"visual"})

        def compress(self, x):
            flat = x.features.flatten(0, 1)[::4]
            return flat / flat.norm(dim=-1, keepdim=True)

    class SoftWeights(Compressor):
        """Pairs merged with weights that move with the features (a softmax of their norms)."""

        name = "soft"
        stages = frozenset({"visual"})

        def compress(self, x):
            pairs = x.features.flatten(0, 1)[: x.features.shape[1] // 2 * 2].view(-1, 2, x.features.shape[-1])
            w = pairs.norm(dim=-1).softmax(-1)
            return (w[..., None] * pairs).sum(1)

    for stage in (Normalised(), SoftWeights()):
        with pytest.raises(ConfigError, match=r"not a fixed weighted mean.*not defined for model.family=qwen3_vl"):
            check_method_family(stage, "qwen3_vl")
        with pytest.raises(ValueError, match="not a fixed weighted mean"):
            qwen3.compress(encoded, stage)
    assert WIDEN == 2.0 ** -40


@pytest.mark.parametrize("name", ["none", "uniform", "dycoke"])
def test_a_shared_prefix_gives_the_logits_of_the_whole_prompt(qwen3, encoded, name):
    """The [head + video] prefix (timestamps, DeepStack and all) prefilled once, continued with the
    question, gives the whole prompt's logits."""
    compressor = methods.build(name)
    compressed = qwen3.compress(encoded, compressor)
    ids, n = qwen3.prompt_ids(QUESTION, "A")
    prefix = qwen3.shared_prefix(compressed, compressor, ids)
    _, _, run = qwen3.loglikelihood(compressed, QUESTION, "A", compressor)
    whole = qwen3.prefill(qwen3.prompt(compressed, ids), compressor, use_cache=False).logits
    prompt = qwen3.prompt(compressed, ids)
    logits, _ = qwen3._continue(prefix, prompt, logits_to_keep=n + 1)
    prefix.state.rewind(prefix.mark)
    # cached against uncached attention (sums in another order), over the prompt's keys, 8 layers
    torch.testing.assert_close(logits, whole[:, -n - 1:], **close(torch.float32, prompt.embeds.shape[1], depth=8))
    assert run.video_tokens_out == int(prompt.video_mask.sum())


# ---- DeepStack inside the LLM -------------------------------------------------------------------------
def test_the_driver_adds_deepstack_to_the_tokens_a_drop_kept(qwen3, encoded):
    """FastV at K=2 drops video tokens before layer 2; Qwen3-VL adds level 2 after it: to the kept
    tokens, their own features. Reference: the stock text model (its own `_deepstack_process`) up to
    layer 2, the drop by hand, then the stock text model over layers 2.. with level 2 of the kept."""
    ids, _ = qwen3.prompt_ids(QUESTION)
    none = methods.build("none")
    prompt = qwen3.prepare(encoded, none, ids)
    fastv = methods.build("fastv", K=2, keep=0.5)
    seen = {}

    class Record:  # FastV's policy, recording what it kept
        def __init__(self, inner):
            self.inner, self.layers = inner, inner.layers

        def act(self, view):
            keep = self.inner.act(view)
            seen["kept"] = view.origin[view.video[keep.video]]
            return keep

        def planned(self, video_tokens, groups=None):
            return None

    out = decoder.prefill(qwen3.llm, prompt.embeds, prompt.positions, prompt.span,
                          Record(fastv.prefill_policy(qwen3.llm_shape)), use_cache=False,
                          video_mask=prompt.video_mask, deepstack=prompt.deepstack)
    lm = qwen3.model.model.language_model
    start, end = prompt.span
    video = torch.zeros(prompt.embeds.shape[1], dtype=torch.bool)
    video[start:end] = prompt.video_mask
    levels = prompt.deepstack
    with torch.no_grad():  # the stock forward, DeepStack included, through layers 0 and 1
        hidden = prompt.embeds
        cos_sin = lm.rotary_emb(hidden, prompt.positions)
        for i in range(2):
            hidden = lm.layers[i](hidden, attention_mask=None, position_embeddings=cos_sin)
            hidden = lm._deepstack_process(hidden, video[None], levels[i])
    kept_video = seen["kept"]
    kept = torch.cat([(~video).nonzero().flatten(), kept_video]).sort().values
    ordinal = torch.cumsum(video, 0) - 1
    mask = video[kept]
    with torch.no_grad():  # layers 2.. of the stock text model on the kept rows, with level 2 of theirs
        full_layers, depth = lm.layers, lm.config.num_hidden_layers
        lm.layers = torch.nn.ModuleList(list(full_layers)[2:])
        lm.config.num_hidden_layers = len(lm.layers)
        try:
            rest = lm(inputs_embeds=hidden[:, kept], position_ids=prompt.positions[..., kept], use_cache=False,
                      visual_pos_masks=mask[None], deepstack_visual_embeds=[levels[2][ordinal[kept_video]]])
        finally:
            lm.layers, lm.config.num_hidden_layers = full_layers, depth
        expected = qwen3.model.lm_head(rest.last_hidden_state)
    # the same layers on the same rows; the kept rows' attention in the stock run sums over the
    # kept keys in another order than... the same kernels: held to float32 sums over the prompt
    torch.testing.assert_close(out.logits, expected, **close(torch.float32, prompt.embeds.shape[1], depth=8))
    n = int(prompt.video_mask.sum())
    assert out.layer_video_tokens == [n, n] + [len(kept_video)] * 6
    # what FastV dropped are video tokens only: every timestamp and marker between the frames stays
    assert torch.equal(out.kept, kept)


def stock_vision(qwen3, clip):
    """The stock vision tower on the clip: (V, D) video tokens and (L, V, D) DeepStack features."""
    with torch.no_grad():
        out = qwen3.model.model.get_video_features(pixel_values_videos=clip.pixels,
                                                  video_grid_thw=torch.tensor([clip.grid_thw]))
    return out.pooler_output[0], torch.stack([level[0] for level in out.deepstack_features])


def stock_text_model(qwen3, ids, video_rows, positions, levels):
    """The stock Qwen3-VL text model (its own `_deepstack_process`) and head on the prompt `ids`
    (a list) with the (V, D) `video_rows` in place of its video placeholders, at (3, 1, T)
    `positions`, the (L, V, D) DeepStack `levels` added at those rows."""
    ids = torch.tensor(ids)
    video = ids == qwen3.video_token_id
    lm = qwen3.model.model.language_model
    with torch.no_grad():
        embeds = lm.embed_tokens(ids).clone()
        embeds[video] = video_rows
        out = lm(inputs_embeds=embeds[None], position_ids=positions, use_cache=False, visual_pos_masks=video[None],
                 deepstack_visual_embeds=list(levels))
        return qwen3.model.lm_head(out.last_hidden_state)


def test_a_kept_subset_runs_as_the_stock_model_on_those_tokens(qwen3, clip, encoded):
    """EVS keeps a subset of the video tokens at their own positions: the harness's logits are the
    stock text model's on the processor's prompt with the dropped video tokens' rows removed (every
    timestamp and marker kept), the kept rows at get_rope_index's positions and with the stock
    vision tower's DeepStack features of those tokens."""
    evs = methods.build("evs", retention=0.4)
    out = evs.compress(encoded.visual)
    features, levels = stock_vision(qwen3, clip)
    kept = out.positions
    assert isinstance(out, VideoTokens) and torch.equal(out.tokens, features[kept])  # a plain subset
    assert 0 < len(kept) < len(features)
    stock = torch.tensor(stock_prompt_ids(qwen3, QUESTION, clip))
    video = stock == qwen3.video_token_id
    positions, _ = qwen3.model.model.get_rope_index(stock[None], video[None].int() * 2,
                                                   video_grid_thw=torch.tensor([clip.grid_thw]))
    rows = ~video
    rows[video.nonzero().flatten()[kept]] = True
    expected = stock_text_model(qwen3, stock[rows].tolist(), features[kept], positions[..., rows],
                                levels[:, kept])
    ids, _ = qwen3.prompt_ids(QUESTION)
    prompt = qwen3.prepare(encoded, evs, ids)
    ours = qwen3.prefill(prompt, evs, use_cache=False).logits
    assert prompt.run.video_tokens_out == len(kept) and prompt.run.text_tokens == int((~video).sum())
    # the same rows, positions and features through the same layers
    torch.testing.assert_close(ours, expected, **close(torch.float32, int(rows.sum()), depth=qwen3.llm_shape.layers))


def test_merged_tokens_run_with_their_merged_deepstack_features(qwen3, clip, encoded):
    """Uniform merges each frame's tokens bilinearly to a smaller grid (a plain output, renumbered):
    the harness's logits are the stock text model's on the processor's prompt with each frame's
    segment holding its merged tokens, at consecutive positions, their DeepStack features the same
    bilinear means of the stock vision tower's, computed here by hand in float64."""
    from methods.uniform import target_grid

    uniform = methods.build("uniform", retention=0.25)
    merged = uniform.compress(encoded.visual)
    _, levels = stock_vision(qwen3, clip)
    frames, _, dim = encoded.visual.features.shape
    h, w = encoded.visual.grid
    r, c = target_grid(0.25, h, w)
    by_hand = torch.einsum("ri,cj,lfijd->lfrcd", bilinear(h, r), bilinear(w, c),
                           levels.double().view(-1, frames, h, w, dim)).reshape(-1, frames * r * c, dim).float()
    ids, _ = qwen3.prompt_ids(QUESTION)
    where = ids.index(qwen3.video_token_id)
    vs, ve = qwen3.config.vision_start_token_id, qwen3.config.vision_end_token_id
    segments = [t for s in clip.timestamps for t in (qwen3.tokenizer(f"<{s:.1f} seconds>", add_special_tokens=False)
                                                      .input_ids + [vs] + [qwen3.video_token_id] * (r * c) + [ve])]
    stock = ids[:where] + segments + ids[where + 1:]
    expected = stock_text_model(qwen3, stock, merged, torch.arange(len(stock)).expand(3, 1, -1), by_hand)
    prompt = qwen3.prepare(encoded, uniform, ids)
    ours = qwen3.prefill(prompt, uniform, use_cache=False).logits
    assert prompt.run.video_tokens_out == frames * r * c and prompt.run.text_tokens == len(stock) - frames * r * c
    # the DeepStack rows by hand in float64 against the replay's float32 means of 4 rows, then the
    # same layers
    torch.testing.assert_close(ours, expected, **close(torch.float32, len(stock), depth=qwen3.llm_shape.layers + 2))


def test_a_merge_before_the_last_deepstack_layer_is_refused(qwen3, encoded):
    small = json.loads((qwen3.directory / "config.json").read_text())
    for name, knobs in (("framefusion", {}), ("sttm", {}), ("sparsevlm", {})):
        with pytest.raises(ConfigError, match=r"merges video tokens inside the LLM at layer \d.*not defined for "
                                              r"model.family=qwen3_vl") as err:
            check_method_family(methods.build(name, **knobs), "qwen3_vl", small)
        assert "\n" not in str(err.value)
    # the published checkpoints (before their config is read): the same, at their depth
    with pytest.raises(ConfigError, match="layer 2"):
        check_method_family(methods.build("sttm"), "qwen3_vl")
    check_method_family(methods.build("sparsevlm"), "qwen3_vl")  # its first merge is at layer 3 of 28
    # after the last DeepStack layer a merge is defined, and a drop anywhere
    for name, knobs in (("sttm", {"layer": 3}), ("holitom", {}), ("fastv", {"K": 1}), ("dart", {})):
        check_method_family(methods.build(name, **knobs), "qwen3_vl", small)
    # one the family does not know of is stopped by the driver, in one line
    ids, _ = qwen3.prompt_ids(QUESTION)
    prompt = qwen3.prepare(encoded, methods.build("none"), ids)

    class MergePairs:
        layers = (1,)

        def act(self, view):
            h = view.hidden[0, view.video]
            return Keep(torch.arange(0, len(h) - 1, 2), (h[0:len(h) - 1:2] + h[1::2]) / 2)

        def planned(self, video_tokens, groups=None):
            return None

    with pytest.raises(ValueError, match="merges video tokens at layer 1, before the DeepStack features"):
        decoder.prefill(qwen3.llm, prompt.embeds, prompt.positions, prompt.span, MergePairs(), use_cache=False,
                        video_mask=prompt.video_mask, deepstack=prompt.deepstack)


def test_random_weights_build_the_published_shapes(tmp_path):
    import yaml

    from harness.models.qwen3_vl import Qwen3_VL
    from harness.models.random_weights import random_model_dir

    shapes = {"qwen3_vl_2b": (True, 28, 2048, [5, 11, 17]), "qwen3_vl_8b": (False, 36, 4096, [8, 16, 24])}
    for name, (tied, layers, width, deepstack) in shapes.items():
        arch = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())["arch"]
        config = Qwen3_VL.config_from_arch(arch, Qwen3_VL.offline_tokenizer())
        text, vision = config.text_config, config.vision_config
        assert config.tie_word_embeddings is tied and text.num_hidden_layers == layers
        assert vision.out_hidden_size == text.hidden_size == width and vision.deepstack_visual_indexes == deepstack
        assert text.rope_parameters == {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                        "mrope_interleaved": True}
        assert text.head_dim == 128 and vision.patch_size == 16
    arch = yaml.safe_load((CONF / "model" / "qwen3_vl_2b.yaml").read_text())["arch"]
    arch["text_config"]["mrope_section"] = [24, 20, 16]
    with pytest.raises(ValueError, match="mrope_section"):
        random_model_dir(tmp_path, "bad", arch, 0, family="qwen3_vl")


@pytest.mark.slow
def test_scissor_runs_end_to_end_on_the_small_qwen3_vl(tmp_path, cache_dir, smoke_questions):
    proc = harness("model=qwen3_vl_small", "+method=scissor", "retention=0.25", "task.limit=2",
                   results=tmp_path / "results", cache=cache_dir)
    summary = json.loads(next((tmp_path / "results").rglob("summary.json")).read_text())
    assert summary["family"] == "qwen3_vl" and summary["n_failed"] == 0 and summary["n_samples"] == 2
    assert "qwen3_vl_small | scissor" in proc.stdout


# ---- every method at Qwen3-VL-2B's widths ---------------------------------------------------------------
METHODS = sorted(path.stem for path in (CONF / "method").glob("*.yaml"))  # every method a run can select
# knobs that make each method do its work on 2 token frames and a 4-layer LLM (defaults otherwise;
# SparseVLM's official layers scaled to 4 layers collide, so it is given the only three there are)
KNOBS_2B = {"framefusion": {"cost": 0.6}, "prunevid": {"tau": 1.0}, "sparsevlm": {"layers": [0, 1, 2]}}
STACK = {"stages": ["visionzip", "fastv"], "visionzip": {"retention": 0.5}}
# refused there, in one line naming why: ToMe acts inside the vision tower, which the adapter runs whole
# (no encoder stage); the others merge video tokens inside the LLM before its last DeepStack layer (2)
REFUSED_2B = {"tome": "encoder stage", "framefusion": "DeepStack", "sttm": "DeepStack", "sparsevlm": "DeepStack"}


@pytest.fixture(scope="module")
def qwen3_2b(tmp_path_factory, smoke_questions):
    """Qwen3-VL-2B's published widths (conf/model/qwen3_vl_2b.yaml: D = 2048, 16 query / 8 key-value
    heads of 128, interleaved M-RoPE 24/20/20, the 1024-wide ViT, the 151936-token vocabulary) with
    random weights, 4 decoder layers and 3 vision blocks with a DeepStack level after each, on 4 frames
    of a smoke clip (2 token frames, a timestamp before each)."""
    import yaml

    from harness.models.qwen3_vl import Qwen3_VL
    from harness.models.random_weights import random_model_dir

    arch = yaml.safe_load((CONF / "model" / "qwen3_vl_2b.yaml").read_text())["arch"]
    arch["text_config"]["num_hidden_layers"] = 4
    arch["vision_config"].update(depth=3, deepstack_visual_indexes=[0, 1, 2])
    directory = random_model_dir(tmp_path_factory.mktemp("models"), "qwen3_vl_2b_width", arch, seed=0,
                                 family="qwen3_vl")
    adapter = Qwen3_VL(str(directory), dtype="float32", device="cpu")
    video = adapter.load_video(str(smoke_questions.parent / "videos" / "clip_004.mp4"), 4)
    cache: dict = {}

    def encoded(needs):
        key = frozenset(needs)
        if key not in cache:
            cache[key] = adapter.encode_video(video, key)
        return cache[key]

    yield adapter, encoded


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_at_qwen3_vl_2b_widths_or_is_refused_in_one_line(qwen3_2b, name):
    adapter, encoded_of = qwen3_2b
    compressor = methods.build(name, **(STACK if name == "pipeline" else KNOBS_2B.get(name, {})))
    try:
        check_method_family(compressor, "qwen3_vl", json.loads((adapter.directory / "config.json").read_text()))
    except ConfigError as err:  # before anything loads
        assert name in REFUSED_2B, str(err)
        assert "\n" not in str(err) and str(err).startswith(f"method {compressor.title}")
        assert "qwen3_vl" in str(err) and REFUSED_2B[name] in str(err)
        return
    assert name not in REFUSED_2B
    encoded = encoded_of(compressor.needs)
    frames, n, width = encoded.visual.features.shape
    assert frames == 2 and width == 2048 and encoded.extras["deepstack"].shape == (3, frames, n, width)
    ids, _ = adapter.prompt_ids(QUESTION)
    answer, run = adapter.generate(encoded, QUESTION, compressor, max_new_tokens=3)
    assert isinstance(answer, str)
    assert run.video_tokens_in == frames * n and len(run.layer_video_tokens) == 4
    assert 0 < run.video_tokens_out <= frames * n and max(run.layer_video_tokens) <= frames * n
    # the timestamps and markers between the frames stay text, whatever the method kept
    assert run.text_tokens == adapter.text_tokens(ids, encoded)
    prompt = adapter.prompt(adapter.compress(encoded, compressor, QUESTION), ids)
    assert [tuple(level.shape) for level in prompt.deepstack] == [(int(prompt.video_mask.sum()), width)] * 3
