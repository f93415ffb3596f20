"""The adapter reproduces the stock transformers model; compressors plug in at the right place."""

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

import methods
from harness.data.video import preprocess, read_frames, uniform_indices
from harness.models.llava_onevision import LlavaOneVision
from methods.core.base import VisualInput
from tests.helpers.tolerance import bound, close


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    video = smoke_questions.parent / "videos" / "clip_000.mp4"
    p = adapter.preprocessing
    return preprocess(read_frames(video, 4), p.size, p.mean, p.std)


def stock_logits(adapter, question, pixels):
    """What calling the HF model directly gives: placeholder expanded to F*196+1 video tokens."""
    ids, _ = adapter.prompt_ids(question)
    where = ids.index(adapter.video_token_id)
    n_video = pixels.shape[0] * adapter.tokens_per_frame + 1
    full = ids[:where] + [adapter.video_token_id] * n_video + ids[where + 1:]
    with torch.no_grad():
        return adapter.model(input_ids=torch.tensor([full]), pixel_values_videos=pixels[None]).logits


def test_none_reproduces_the_stock_model(adapter, pixels):
    question = "What colour is the moving square?\nA. red\nB. blue"
    ids, _ = adapter.prompt_ids(question)
    none = methods.build("none")
    prompt = adapter.prepare(pixels, none, ids)
    with torch.no_grad():
        ours = adapter.prefill(prompt, none, use_cache=False).logits  # the shared decoder driver
    expected = stock_logits(adapter, question, pixels)
    assert ours.shape == expected.shape
    # `none` runs the stock layers on the same inputs in the same order: exact
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert prompt.run.video_tokens_in == prompt.run.video_tokens_out == 4 * 196
    assert prompt.positions.tolist() == [list(range(ours.shape[1]))]


def test_compressed_video_keeps_the_trailing_newline(adapter, pixels):
    ids, _ = adapter.prompt_ids("Q?")
    prompt = adapter.prepare(pixels, methods.build("uniform", retention=0.25), ids)
    embeds, (start, end), run = prompt.embeds, prompt.span, prompt.run
    assert end - start == run.video_tokens_out == 4 * 49
    newline = adapter.model.model.image_newline.to(embeds.dtype)
    assert torch.equal(embeds[0, end], newline)  # a copy of the parameter: exact
    assert embeds.shape[1] == len(ids) + 4 * 49  # the placeholder became 4*49 tokens + newline


def test_generation_with_cache_matches_full_recompute(adapter, pixels):
    text, run = adapter.generate(pixels, "Q?", methods.build("none"), max_new_tokens=5)
    ids, _ = adapter.prompt_ids("Q?")
    embeds = adapter.prepare(pixels, methods.build("none"), ids).embeds
    tokens = []
    for _ in range(5):  # greedy without a KV cache
        with torch.no_grad():
            logits = adapter.model(inputs_embeds=embeds).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt in adapter.stop_ids:
            break
        tokens.append(nxt)
        emb = adapter.model.get_input_embeddings()(torch.tensor([[nxt]]))
        embeds = torch.cat([embeds, emb], 1)
    assert text == adapter.tokenizer.decode(tokens, skip_special_tokens=True)
    assert set(run.timings) == {"vision", "compressor", "prefill", "decode", "ttft"}
    assert run.timings["ttft"] >= run.timings["prefill"] + run.timings["vision"]


def test_loglikelihood_matches_logits(adapter, pixels):
    logprob, greedy, _ = adapter.loglikelihood(pixels, "Q?", "AB", methods.build("none"))
    ids, n = adapter.prompt_ids("Q?", "AB")
    logits = stock_logits(adapter, "Q?", pixels)  # prompt only; extend by hand below
    where = ids.index(adapter.video_token_id)
    full = ids[:where] + [adapter.video_token_id] * (4 * 196 + 1) + ids[where + 1:]
    with torch.no_grad():
        logits = adapter.model(input_ids=torch.tensor([full]), pixel_values_videos=pixels[None]).logits[0]
    logp = logits.log_softmax(-1)
    expected = sum(logp[len(full) - n - 1 + i, full[len(full) - n + i]].item() for i in range(n))
    # the same logits (`none` is the stock model exactly); the log-softmax over the vocabulary, then
    # the answer's tokens summed in float32 against in float64
    assert logprob == pytest.approx(expected, rel=bound(torch.float32, logp.shape[-1], depth=2))


def test_frames_are_sampled_uniformly_and_normalised():
    assert list(uniform_indices(16, 4)) == [0, 5, 10, 15]
    frames = np.full((2, 10, 20, 3), 255, np.uint8)
    x = preprocess(frames, 384, [0.5] * 3, [0.5] * 3)
    assert x.shape == (2, 3, 384, 384)
    # a constant uint8 frame resizes to itself, and (255 - 127.5) / 127.5 = 1: every step exact
    torch.testing.assert_close(x, torch.ones_like(x), rtol=0, atol=0)


# ---- uniform pooling --------------------------------------------------------------------------
@pytest.mark.parametrize("r, grid", [(0.25, (7, 7)), (0.5, (7, 14)), (0.1, (4, 5)), (1.0, (14, 14)),
                                     (0.2, (3, 13)), (0.004, (1, 1))])
def test_uniform_grid_follows_the_spec(r, grid):
    from methods.uniform import target_grid

    assert target_grid(r, 14, 14) == grid
    rows, cols = grid
    # the chosen grid minimises |h*w - r*196| over h <= w <= 14
    best = min(abs(h * w - r * 196) for h in range(1, 15) for w in range(h, 15))
    assert abs(rows * cols - r * 196) == best


def test_uniform_is_bilinear_per_frame_in_frame_major_order():
    x = torch.randn(3, 196, 8)
    out = methods.build("uniform", retention=0.25).compress(VisualInput(x, (14, 14)))
    for f in range(3):
        grid = x[f].view(14, 14, 8).permute(2, 0, 1)[None]
        expected = nnf.interpolate(grid, size=(7, 7), mode="bilinear", align_corners=False)
        # the same bilinear kernel on the same frame (each output a fixed sum of 4 inputs): exact
        torch.testing.assert_close(out[f * 49:(f + 1) * 49], expected[0].permute(1, 2, 0).reshape(49, 8),
                                   rtol=0, atol=0)


def test_uniform_full_retention_is_identity():
    x = torch.randn(2, 196, 8)
    out = methods.build("uniform", retention=1.0).compress(VisualInput(x, (14, 14)))
    torch.testing.assert_close(out, x.flatten(0, 1), rtol=0, atol=0)  # a resize to the same grid copies: exact


def test_uniform_below_one_token_per_frame_pools_time():
    x = torch.randn(32, 196, 4)
    r = 8 / (32 * 196)  # 8 tokens for 32 frames
    out = methods.build("uniform", retention=r).compress(VisualInput(x, (14, 14)))
    centre = nnf.interpolate(x.view(32, 14, 14, 4).permute(0, 3, 1, 2), size=(1, 1), mode="bilinear",
                             align_corners=False).flatten(1)
    # the same resize; the time means over 4 frames taken by two different reductions
    torch.testing.assert_close(out, centre.view(8, 4, 4).mean(1), **close(torch.float32, 4))
