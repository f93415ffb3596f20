"""The model-adapter interface (harness/models/base.py), exercised by every family with the same
tests: the tiny LLaVA-OneVision, the small random Qwen2.5-VL (conf/model/qwen2_5_vl_small.yaml) and
the small random Qwen3-VL (conf/model/qwen3_vl_small.yaml).

For each: `none` through the shared decoder driver equals calling the stock transformers model
directly (exactly, float32), cached decoding follows the full recompute, the log-likelihood is the
stock model's, the feature cache returns what the encoder gave, and every method runs.
"""

import pytest
import torch

import methods
from harness.data.feature_cache import FeatureCache, encode_file
from harness.models import FAMILIES, adapter_class, family_of
from methods.core import decoder
from tests.helpers.tolerance import bound, close

QUESTION = "What colour is the moving square?\nA. red\nB. blue"
FRAMES = 4


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def family(request, tiny_llava, qwen, qwen3, smoke_questions):
    adapter = {"llava_onevision": tiny_llava, "qwen2_5_vl": qwen, "qwen3_vl": qwen3}[request.param]
    path = str(smoke_questions.parent / "videos" / "clip_003.mp4")
    return request.param, adapter, path, adapter.load_video(path, FRAMES)


def stock_inputs(name, adapter, ids, video):
    """The stock model's own inputs for prompt `ids` about `video`: the placeholder expanded to one
    token per video token (and OneVision's newline), the pixels in the processor's layout."""
    where = ids.index(adapter.video_token_id)
    if name == "llava_onevision":
        n = video.shape[0] * adapter.tokens_per_frame + 1  # + the newline
        full = torch.tensor([ids[:where] + [adapter.video_token_id] * n + ids[where + 1:]])
        return {"input_ids": full, "pixel_values_videos": video[None]}
    t, gh, gw = video.grid_thw
    n = t * gh * gw // 4
    full = torch.tensor([ids[:where] + [adapter.video_token_id] * n + ids[where + 1:]])
    if name == "qwen3_vl":  # a timestamp and markers around each frame's tokens (the processor's
        # prompt, which tests/test_qwen3_vl.py proves equal to this layout)
        encoded = adapter.encode_video(video)
        full = torch.tensor([adapter.layout(ids, adapter.compress(encoded, methods.build("none")).tokens, encoded)[0]])
        return {"input_ids": full, "pixel_values_videos": video.pixels, "video_grid_thw": torch.tensor([video.grid_thw]),
                "mm_token_type_ids": (full == adapter.video_token_id).int() * 2}
    return {"input_ids": full, "pixel_values_videos": video.pixels, "video_grid_thw": torch.tensor([video.grid_thw]),
            "second_per_grid_ts": torch.tensor([video.second_per_grid]),
            "mm_token_type_ids": (full == adapter.video_token_id).int() * 2}


@pytest.mark.slow
def test_families_are_registered_and_known_from_a_checkpoint(tiny_model_dir, qwen_model_dir, qwen3, tmp_path):
    for name in FAMILIES:
        assert adapter_class(name).family == name
    with pytest.raises(ValueError, match="model.family='llava'"):
        adapter_class("llava")
    assert family_of(str(tiny_model_dir)) == "llava_onevision"
    assert family_of(str(qwen_model_dir)) == "qwen2_5_vl"
    assert family_of(str(qwen3.directory)) == "qwen3_vl"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama'.* names none of the families"):
        family_of(str(tmp_path))


def test_a_family_supplies_the_whole_interface(tmp_path):
    """Every registered family implements each abstract method of VideoLLM; a family that misses
    one fails when it is instantiated, naming what is missing, before any weights load."""
    from harness.models.base import VideoLLM

    for name in FAMILIES:
        assert not adapter_class(name).__abstractmethods__, name

    class Partial(VideoLLM):
        family = "partial"

        def load_video(self, path, frames):
            return None

    with pytest.raises(TypeError, match="config_from_arch, embed_video, encode, llm, video_tokens, vision_flops"):
        Partial(str(tmp_path))


def test_a_checkpoint_of_another_family_is_refused_before_its_weights_load(qwen_model_dir):
    from harness.models.base import ModelLoadError
    from harness.models.llava_onevision import LlavaOneVision

    with pytest.raises(ModelLoadError, match="model_type 'qwen2_5_vl'; the llava_onevision adapter expects"):
        LlavaOneVision(str(qwen_model_dir), device="cpu")


@pytest.mark.slow
def test_none_equals_the_stock_model(family):
    name, adapter, _, video = family
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(video, none, ids)
    ours = adapter.prefill(prompt, none, use_cache=False).logits
    with torch.no_grad():
        stock = adapter.model(**stock_inputs(name, adapter, ids, video)).logits
    assert ours.shape == stock.shape
    # `none` runs the stock layers on the same inputs in the same order: exact
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    assert prompt.run.video_tokens_in == prompt.run.video_tokens_out == prompt.run.frames * prompt.run.frame_tokens


@pytest.mark.slow
def test_cached_decoding_follows_the_full_recompute(family):
    name, adapter, _, video = family
    none = methods.build("none")
    ids, _ = adapter.prompt_ids(QUESTION)
    inputs = stock_inputs(name, adapter, ids, video)
    prompt = adapter.prepare(video, none, ids)
    out = adapter.prefill(prompt, none, use_cache=True)
    token = out.logits[0, -1].argmax().view(1, 1)
    for _ in range(3):
        step = decoder.decode(adapter.llm, out.state, token)[0, -1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token).int()], 1)
        with torch.no_grad():
            full = adapter.model(**inputs).logits[0, -1]
        # cached decode against an uncached stock recompute (the cache sums in another order):
        # attention over every key, in each of the LLM's layers (tests/helpers/tolerance.py)
        keys, layers = inputs["input_ids"].shape[1], adapter.llm.shape.layers
        torch.testing.assert_close(step, full, **close(torch.float32, keys, depth=layers))
        token = full.argmax().view(1, 1)


def test_loglikelihood_is_the_stock_models(family):
    name, adapter, _, video = family
    logprob, greedy, run = adapter.loglikelihood(video, QUESTION, "AB", methods.build("none"))
    ids, n = adapter.prompt_ids(QUESTION, "AB")
    inputs = stock_inputs(name, adapter, ids, video)
    with torch.no_grad():
        logp = adapter.model(**inputs).logits[0].log_softmax(-1)
    full = inputs["input_ids"][0]
    expected = sum(logp[len(full) - n - 1 + i, full[len(full) - n + i]].item() for i in range(n))
    # the same logits (`none` is the stock model exactly); the log-softmax over the vocabulary, then
    # the answer's tokens summed in float32 against in float64
    assert logprob == pytest.approx(expected, rel=bound(torch.float32, logp.shape[-1], depth=2))
    assert run.text_tokens == adapter.text_tokens(ids, video)


def test_feature_cache_returns_what_the_encoder_gave(family, tmp_path):
    _, adapter, path, _ = family
    cache = FeatureCache(tmp_path, adapter.fingerprint)
    needs = frozenset({"patch_scores"})
    first = encode_file(adapter, path, FRAMES, needs, cache)
    again = encode_file(adapter, path, FRAMES, needs, cache)
    assert again.cached and not first.cached
    for field in ("features", "patch_scores", "patch_keys"):
        assert torch.equal(getattr(again.visual, field), getattr(first.visual, field))
    assert again.visual.grid == first.visual.grid and again.visual.patch_grid == first.visual.patch_grid
    assert again.extras.keys() == first.extras.keys()
    assert all(torch.equal(again.extras[k], first.extras[k]) for k in first.extras)
    assert adapter.video_tokens(path, FRAMES) == first.visual.features.shape[0] * first.visual.features.shape[1]


# knobs that make each method do its work on a short clip of the small models
KNOBS = {"framefusion": {"cost": 0.7}, "prunevid": {"tau": 1.0}}
# methods a family refuses itself (its check_method), before anything loads: on the small Qwen3-VL,
# those merging video tokens inside the LLM before its last DeepStack layer (2)
REFUSED = {"qwen3_vl": {"framefusion", "sparsevlm", "sttm"}}


@pytest.mark.parametrize("name", [n for n in methods.known() if n != "pipeline"] + ["pipeline"])
def test_every_method_runs(family, name):
    """Every method runs on every family, or is refused in one line before anything loads."""
    import json

    from harness.errors import ConfigError
    from harness.run.validate import check_method_family

    family_name, adapter, _, video = family
    knobs = {"stages": ["visionzip", "fastv"]} if name == "pipeline" else KNOBS.get(name, {})
    compressor = methods.build(name, **knobs)
    config = json.loads((adapter.directory / "config.json").read_text())
    try:
        check_method_family(compressor, family_name, config)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith(f"method {compressor.title}")
        assert ("DeepStack" in str(err)) == (name in REFUSED.get(family_name, ())), str(err)
        return
    assert name not in REFUSED.get(family_name, ())
    encoded = adapter.encode_video(video, compressor.needs)
    text, run = adapter.generate(encoded, QUESTION, compressor, max_new_tokens=3)
    assert isinstance(text, str)
    full = adapter.uncompressed_tokens(encoded.visual)  # (ToMe's merged features are fewer)
    assert run.video_tokens_in == full and 0 < run.video_tokens_out <= full
    assert len(run.layer_video_tokens) == adapter.llm_shape.layers
    if name != "none":
        assert run.video_tokens_out < full or min(run.layer_video_tokens) < full or run.decode_video_visible
