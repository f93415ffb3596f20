"""Frame preprocessing and sampling equal the stock pipeline's (transformers' LLaVA-OneVision video
processor; lmms_eval's llava_onevision frame sampling) on real decoded frames.

The reference below restates the processor's steps as transformers 5.x runs them
(`LlavaOnevisionVideoProcessor` = `BaseVideoProcessor` over `TorchvisionBackend`): frames to a
contiguous (F, 3, H, W) uint8 tensor, `torchvision.transforms.v2.functional.resize` to (384, 384)
with the class's resample (bicubic) and antialias=True (on the CPU torchvision hands uint8 frames to
torch's uint8 bicubic kernel), then the fused rescale-and-normalise `normalize(x.float(), mean/rf,
std/rf)`. Where torchvision imports (a GPU machine), the processor itself is compared too.
"""

import ast
import importlib.util
import json

import numpy as np
import pytest
import torch

from harness.data.video import VideoError, preprocess, read_frames, uniform_indices
from harness.models.base import ModelLoadError
from harness.models.llava_onevision import Preprocessing
from tests.helpers import write_natural_video

TOLERANCE = 1e-6  # max abs difference after normalisation (float32 rounding of the fused affine)


def processor_steps(frames: np.ndarray, config: dict) -> torch.Tensor:
    """The processor's steps, read from its class defaults overridden by the checkpoint config."""
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor as Stock,
    )

    get = lambda key: config.get(key, getattr(Stock, key))  # noqa: E731
    assert get("resample") == 3 and get("do_resize") and get("do_rescale") and get("do_normalize")
    size = get("size")
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # _prepare_input_videos
    # torchvision resize_image: on the CPU uint8 is an acceptable dtype for bicubic, so no cast
    video = torch.nn.functional.interpolate(video, size=[size["height"], size["width"]], mode="bicubic",
                                            align_corners=False, antialias=True)
    rf = get("rescale_factor")
    mean = torch.tensor(get("image_mean")) * (1.0 / rf)  # _fuse_mean_std_and_rescale_factor
    std = torch.tensor(get("image_std")) * (1.0 / rf)
    return (video.to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # tvF.normalize


@pytest.fixture(scope="module")
def natural_video(tmp_path_factory):
    """A 320x240 mp4 with gradients, edges and noise (resampling matters), 12 frames."""
    return write_natural_video(tmp_path_factory.mktemp("video") / "natural.mp4", 320, 240, 12)


CONFIGS = {
    "llava-hf (SigLIP mean/std)": {"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                   "size": {"height": 384, "width": 384}, "rescale_factor": 1 / 255},
    "processor defaults (CLIP mean/std)": {},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_preprocessing_equals_the_processor_steps_on_decoded_frames(natural_video, smoke_questions,
                                                                    tmp_path, name):
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(CONFIGS[name]))
    p = Preprocessing.from_model_dir(tmp_path)
    for video in (natural_video, smoke_questions.parent / "videos" / "clip_000.mp4"):
        frames = read_frames(video, 8)
        ours, reference = p.apply(frames), processor_steps(frames, CONFIGS[name])
        assert ours.shape == reference.shape == (8, 3, 384, 384)
        assert float((ours - reference).abs().max()) <= TOLERANCE


def test_the_resize_is_the_uint8_kernel_not_a_rounded_float_resize(natural_video):
    """A float resize rounded afterwards differs from torchvision's CPU uint8 path: guard the choice."""
    frames = read_frames(natural_video, 2)
    ours = preprocess(frames, 384, [0.5] * 3, [0.5] * 3)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    floaty = torch.nn.functional.interpolate(x, size=(384, 384), mode="bicubic", antialias=True,
                                             align_corners=False).clamp(0, 255).round()
    assert float((ours - (floaty - 127.5) / 127.5).abs().max()) > 1e-3


def test_the_stock_processor_itself_when_torchvision_works(natural_video):
    try:
        import torchvision  # noqa: F401  (broken against the CPU torch on the CI machine)
    except Exception as err:  # a broken install raises RuntimeError/AttributeError, not ImportError
        pytest.skip(f"torchvision unavailable: {type(err).__name__}")
    from transformers import LlavaOnevisionVideoProcessor

    frames = read_frames(natural_video, 8)
    processor = LlavaOnevisionVideoProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    stock = processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    ours = preprocess(frames, 384, [0.5] * 3, [0.5] * 3)
    assert float((ours - stock).abs().max()) <= TOLERANCE


def test_settings_the_harness_does_not_implement_are_refused(tmp_path):
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(ModelLoadError, match="video_preprocessor_config.json: resample=2"):
        Preprocessing.from_model_dir(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"do_center_crop": True}))
    with pytest.raises(ModelLoadError, match="do_center_crop=true"):
        Preprocessing.from_model_dir(tmp_path)
    with pytest.raises(VideoError, match="uint8"):
        preprocess(np.zeros((1, 4, 4, 3), np.float32), 384, [0.5] * 3, [0.5] * 3)


def lmms_eval_load_video():
    """lmms_eval's `Llava_OneVision.load_video`, compiled from its own source (the module imports the
    original LLaVA package, which is not installed here), with decord stood in for by a fake."""
    origin = importlib.util.find_spec("lmms_eval.models.simple.llava_onevision").origin
    tree = ast.parse(open(origin).read())
    func = next(node for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name == "load_video")
    namespace = {"np": np}

    class FakeReader:
        def __init__(self, path, ctx=None):
            self.total = int(path.split(":")[1])

        def __len__(self):
            return self.total

        def get_batch(self, idx):
            class Batch:
                def asnumpy(self):
                    return np.array(idx)
            return Batch()

    namespace.update(VideoReader=FakeReader, cpu=lambda i: None)
    exec(compile(ast.Module(body=[func], type_ignores=[]), origin, "exec"), namespace)
    return namespace["load_video"]


@pytest.mark.parametrize("total, count", [(16, 4), (16, 8), (100, 32), (31, 32), (7, 8), (1, 3), (300, 1)])
def test_frame_sampling_equals_lmms_eval_llava_onevision(total, count):
    load_video = lmms_eval_load_video()
    assert uniform_indices(total, count).tolist() == load_video(None, f"video:{total}", count).tolist()
