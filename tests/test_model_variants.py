"""The real checkpoints' numerics on a small model: bfloat16 weights and activations, tied word
embeddings (as LLaVA-OneVision-0.5B has), SigLIP normalisation, the published feature selection
(`full`, last layer). The float32 tiny model of the other tests never runs these paths.

LLaVA-OneVision's published configs use vision_feature_select_strategy "full": SigLIP has no CLS
token, and the video pooling reshapes the 729 patches to 27 x 27, so "default" (drop the first
patch) cannot run on video in transformers' own model either; the adapter refuses it clearly.
"""

import json

import pytest
import torch

import methods
from harness.models.base import ModelLoadError
from harness.models.llava_onevision import LlavaOneVision
from harness.models.random_weights import random_model_dir
from methods.core import decoder
from tests.helpers.tolerance import bound

QUESTION = "What colour is the moving square?\nA. red\nB. blue"
SMALL = {  # real structure, small widths; tied embeddings and bf16 as the 0.5B checkpoint
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 384, "patch_size": 14},
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 261,
                    "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
}


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    directory = random_model_dir(tmp_path_factory.mktemp("models"), "small-bf16", SMALL, seed=0)
    return LlavaOneVision(str(directory), dtype="bfloat16", device="cpu")


@pytest.fixture(scope="module")
def pixels(smoke_questions, bf16):
    from harness.data.video import read_frames

    return bf16.preprocessing.apply(read_frames(smoke_questions.parent / "videos" / "clip_006.mp4", 3))


def stock_logits(adapter, pixels, ids):
    where = ids.index(adapter.video_token_id)
    full = ids[:where] + [adapter.video_token_id] * (pixels.shape[0] * 196 + 1) + ids[where + 1:]
    with torch.no_grad():
        return adapter.model(input_ids=torch.tensor([full]), pixel_values_videos=pixels[None]).logits


def test_the_small_model_has_the_real_checkpoints_settings(bf16):
    assert bf16.model.dtype == torch.bfloat16 and bf16.config.tie_word_embeddings
    assert bf16.model.lm_head.weight.data_ptr() == bf16.model.get_input_embeddings().weight.data_ptr()
    assert bf16.preprocessing.mean == [0.5] * 3 and bf16.config.vision_feature_select_strategy == "full"


def test_none_reproduces_the_stock_model_in_bfloat16(bf16, pixels):
    none = methods.build("none")
    ids, _ = bf16.prompt_ids(QUESTION)
    prompt = bf16.prepare(pixels, none, ids)
    assert prompt.embeds.dtype == torch.bfloat16
    ours = bf16.prefill(prompt, none, use_cache=False).logits
    # `none` runs the stock layers on the same inputs in the same order: exact
    torch.testing.assert_close(ours, stock_logits(bf16, pixels, ids), rtol=0, atol=0)


def test_cached_decoding_follows_the_full_recompute_in_bfloat16(bf16, pixels):
    none = methods.build("none")
    ids, _ = bf16.prompt_ids(QUESTION)
    prompt = bf16.prepare(pixels, none, ids)
    out = bf16.prefill(prompt, none, use_cache=True)
    embeds, token = prompt.embeds, out.logits[0, -1].argmax().view(1, 1)
    for _ in range(4):
        step = decoder.decode(bf16.llm, out.state, token)[0, -1].float()
        embeds = torch.cat([embeds, bf16.model.get_input_embeddings()(token)], 1)
        with torch.no_grad():
            full = bf16.model(inputs_embeds=embeds).logits[0, -1].float()
        # bf16 rounds the cached and the recomputed path differently: close, and the same choice.
        # Each op accumulates in float32 (attention over every key) and rounds its result to
        # bfloat16 once, so the paths are one bfloat16 rounding apart per op: 16 chained ops in each
        # of the 4 layers (norm 2, projection, rotary 2, attention, output, residual, norm 2, gate,
        # act, product, down, residual), 3 in the final norm and head (tests/helpers/tolerance.py;
        # γ_n of bfloat16 itself has no bound at this length)
        ops = 16 * 4 + 3
        tol = bound(torch.bfloat16, 1, depth=ops) + bound(torch.float32, embeds.shape[1], depth=4)
        torch.testing.assert_close(step, full, rtol=tol, atol=tol)
        assert int(step.argmax()) == int(full.argmax())
        token = step.argmax().view(1, 1)


@pytest.mark.parametrize("name, knobs", [("fastv", {"keep": 1.0}), ("pdrop", {"lambda_": 1.0}),
                                         ("uniform", {"retention": 1.0}), ("pllava", {"retention": 1.0})])
def test_keep_everything_equals_none_in_bfloat16(bf16, pixels, name, knobs):
    none, method = methods.build("none"), methods.build(name, **knobs)
    ids, _ = bf16.prompt_ids(QUESTION)
    expected = bf16.prefill(bf16.prepare(pixels, none, ids), none, use_cache=False).logits
    got = bf16.prefill(bf16.prepare(pixels, method, ids), method, use_cache=False).logits
    # keeping everything runs the same kernels on the same inputs in the same order as `none`: exact
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["scissor", "topk", "visionzip", "vidcom2", "divprune", "fastvid",
                                  "dycoke", "holitom", "prunevid", "fastv", "framefusion"])
def test_every_method_runs_in_bfloat16(bf16, pixels, name):
    knobs = {"framefusion": {"cost": 0.7}}.get(name, {})
    method = methods.build(name, **knobs)
    text, run = bf16.generate(bf16.encode_video(pixels, method.needs), QUESTION, method, max_new_tokens=3)
    assert isinstance(text, str) and 0 < run.video_tokens_out <= run.video_tokens_in == 3 * 196


def test_a_default_feature_selection_is_refused_clearly(tmp_path):
    arch = json.loads(json.dumps(SMALL))
    arch["vision_feature_select_strategy"] = "default"
    directory = random_model_dir(tmp_path, "small-default", arch, seed=0)
    with pytest.raises(ModelLoadError, match="vision_feature_select_strategy='default'"):
        LlavaOneVision(str(directory), dtype="bfloat16", device="cpu")
