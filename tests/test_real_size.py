"""Every method at real dimensions: one sample through LLaVA-OneVision-0.5B's full architecture,
through its 7B's widths (D = 3584, 28 query / 4 key-value heads, SigLIP-so400m) and through
Qwen2.5-VL-3B's widths (D = 2048, 16 query / 2 key-value heads, M-RoPE sections 16/24/24, the
1280-wide ViT), with random weights.

The shapes are the published ones from conf/model/*.yaml; the 7B and 3B checks keep their widths and
head counts but only 4 decoder layers and 1 encoder layer (Qwen2.5-VL's a full-attention one), so
they fit a CI machine. A shape bug at real size (a hard-coded width, head count, grouped-query ratio
or vocabulary) fails here.
"""

import pytest
import torch
import yaml

import methods
from harness.models import adapter_class
from harness.models.llava_onevision import LlavaOneVision
from harness.models.random_weights import random_model_dir
from tests.helpers import CONF

pytestmark = pytest.mark.slow

FRAMES = 2
QUESTION = "What colour is the moving square?\nA. red\nB. green\nC. blue\nD. white"
# knobs that make each method do its work on 2 frames (defaults otherwise)
KNOBS = {"uniform": {"retention": 0.25}, "topk": {"retention": 0.25}, "pllava": {"retention": 0.25},
         "visionzip": {"retention": 0.25}, "vidcom2": {"retention": 0.25}, "fastvid": {"retention": 0.25},
         "divprune": {"retention": 0.25}, "holitom": {"retention": 0.25},
         "framefusion": {"cost": 0.6}}  # 4 layers and a long prompt: a FLOPs floor near 0.5
STACK = {"stages": ["visionzip", "fastv"], "visionzip": {"retention": 0.5}}
# SparseVLM's official layers (2, 6, 15) scaled to 4 layers collide; it asks for three layers there
SHALLOW = {"sparsevlm": {"layers": [0, 1, 2]}}
# ToMe merges at most half of the tokens in each encoder layer: one layer leaves 365 of the 729 patches
# per frame, more than the 196 pooled tokens, so on a 1-layer encoder it keeps everything (r = 0)
SHALLOW_VISION = {"tome": {"retention": None, "r": 0}}


def arch_of(name: str, text_layers=None, vision_layers=None) -> dict:
    arch = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())["arch"]
    if text_layers:
        arch["text_config"]["num_hidden_layers"] = text_layers
    if vision_layers and "depth" in arch["vision_config"]:  # Qwen2.5-VL: keep one full-attention block
        arch["vision_config"].update(depth=vision_layers, fullatt_block_indexes=[vision_layers - 1])
    elif vision_layers:
        arch["vision_config"]["num_hidden_layers"] = vision_layers
    return arch


SETUPS = {"0.5b": ("llava_ov_0.5b", {}), "7b-width": ("llava_ov_7b", {"text_layers": 4, "vision_layers": 1}),
          "qwen-3b-width": ("qwen2_5_vl_3b", {"text_layers": 4, "vision_layers": 1})}


@pytest.fixture(scope="module", params=list(SETUPS))
def real(request, tmp_path_factory, smoke_questions):
    name, shrink = SETUPS[request.param]
    arch = arch_of(name, **shrink)
    family = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())["family"]
    directory = random_model_dir(tmp_path_factory.mktemp("models"), name, arch, seed=0, family=family)
    adapter = adapter_class(family)(str(directory), dtype="float32", device="cpu")
    pixels = adapter.load_video(str(smoke_questions.parent / "videos" / "clip_004.mp4"), FRAMES)
    encoded = {}

    def video(needs):
        key = frozenset(needs)
        if key not in encoded:
            encoded[key] = adapter.encode_video(pixels, key)
        return encoded[key]

    yield adapter, arch, video
    encoded.clear()  # the module's features go with it


@pytest.mark.parametrize("name", [n for n in methods.known() if n != "pipeline"] + ["pipeline"])
def test_one_sample_per_method_at_real_dimensions(real, name):
    adapter, arch, video = real
    text = arch["text_config"]
    assert adapter.config.text_config.hidden_size == text["hidden_size"]
    assert adapter.config.vision_config.hidden_size == arch["vision_config"]["hidden_size"]
    knobs = STACK if name == "pipeline" else KNOBS.get(name, {})
    if text["num_hidden_layers"] < 8:
        knobs = {**knobs, **SHALLOW.get(name, {})}
    if arch["vision_config"].get("num_hidden_layers", 2) < 2:
        knobs = {**knobs, **SHALLOW_VISION.get(name, {})}
    compressor = methods.build(name, **knobs)
    if compressor.has("encoder") and "encoder" not in adapter.stages:  # ToMe on Qwen2.5-VL: refused
        with pytest.raises(ValueError, match="acts inside the vision encoder"):
            video(compressor.needs)
        return
    encoded = video(compressor.needs)
    full = adapter.uncompressed_tokens(encoded.visual)  # (ToMe's merged features are fewer)
    if isinstance(adapter, LlavaOneVision):
        assert full == FRAMES * 196
    else:  # one temporal patch of the 2 frames, the 96x96 clip at the 448x448 pixel floor
        assert encoded.visual.features.shape[:2] == (1, 256)
    answer, run = adapter.generate(encoded, QUESTION, compressor, max_new_tokens=3)
    assert isinstance(answer, str)
    assert run.video_tokens_in == full
    assert len(run.layer_video_tokens) == text["num_hidden_layers"]
    assert 0 < run.video_tokens_out <= full and max(run.layer_video_tokens) <= full
    assert run.timings["ttft"] > 0


def test_random_weights_are_seeded_built_in_place_and_labelled(tmp_path):
    arch = arch_of("llava_ov_0.5b", text_layers=1, vision_layers=1)
    a = random_model_dir(tmp_path, "x", arch, seed=0)
    assert random_model_dir(tmp_path, "x", arch, seed=0) == a  # the same recipe: the same directory
    assert random_model_dir(tmp_path, "x", arch, seed=1) != a
    assert not list(a.glob("*.safetensors")) and not list(a.glob("*.bin"))  # no weights on disk
    first = LlavaOneVision(str(a), dtype="bfloat16", device="cpu")
    second = LlavaOneVision(str(a), dtype="bfloat16", device="cpu")
    assert first.random_weights and first.model.dtype == torch.bfloat16
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)  # seeded
    assert first.fingerprint == second.fingerprint
    other = LlavaOneVision(str(random_model_dir(tmp_path, "x", arch, seed=1)), dtype="bfloat16", device="cpu")
    assert other.fingerprint != first.fingerprint
    assert not torch.equal(next(other.model.parameters()), next(first.model.parameters()))
