"""Qwen2.5-VL's video input, step for step as lmms_eval's `qwen2_5_vl` model produces it, without
torchvision.

lmms_eval (`lmms_eval/models/simple/qwen2_5_vl.py`, defaults min_pixels=256*28*28,
max_pixels=1605632, max_num_frames = model.frames) hands the video path to qwen-vl-utils'
`process_vision_info` (`qwen_vl_utils/vision_process.py`), then subsamples the frames it returns
and passes them to the processor (transformers' `Qwen2VLVideoProcessor` in
`models/qwen2_vl/video_processing_qwen2_vl.py`):

1. qwen-vl-utils `fetch_video` (decord backend): `smart_nframes` at FPS=2 (at least 4 and at most
   min(768, total) frames, floored to a multiple of 2), indices `linspace(0, total-1, n).round()`;
2. `smart_resize` of the frame size to multiples of 28 (patch 14 x merge 2) within [min_pixels,
   min(max_pixels, max(min(768*28*28, total_pixels/n*2), 1.05*min_pixels))], total_pixels =
   128000*28*28*0.9; torchvision's (v1) bicubic antialiased resize of the uint8 frames, which on a
   tensor runs in float32 and rounds back to uint8, then `.float()`;
3. lmms_eval keeps `unique(linspace(0, n-1, max_num_frames, dtype=int))` of those frames and the
   last one;
4. the processor: its own `smart_resize` leaves a size that is already a multiple of 28 within its
   bounds unchanged (the resize at the same size is the identity), the fused rescale-and-normalise
   (x - mean/rf) / (std/rf) with OpenAI CLIP's mean/std, the last frame repeated to a multiple of
   temporal_patch_size = 2, and `patchify`'s layout: (t, h/2, w/2, 2, 2) patches of C x 2 x 14 x 14.

Steps 1-3 are sampled first and only the kept frames are decoded and resized (resizing is per frame,
so the pixels are the same). tests/test_qwen2_5_vl.py checks every step against the source of
qwen-vl-utils, lmms_eval and transformers (compiled from their files: the modules themselves import
torchvision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

from harness.data.video import VideoError, normalize, open_video

# qwen_vl_utils/vision_process.py
FPS, FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 2, 4, 768
VIDEO_MAX_TOKEN_NUM, MODEL_SEQ_LEN, MAX_RATIO = 768, 128000, 200
# lmms_eval/models/simple/qwen2_5_vl.py defaults
LMMS_MIN_PIXELS, LMMS_MAX_PIXELS = 256 * 28 * 28, 1605632


def smart_nframes(total: int, video_fps: float) -> int:
    """qwen-vl-utils' frame count at FPS frames per second (its `smart_nframes` without `nframes`)."""
    min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = total / video_fps * FPS
    n = min(min(max(n, min_frames), max_frames), total)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total:
        raise VideoError(f"a video of {total} frames cannot be sampled as Qwen2.5-VL's processing does "
                         f"(it needs at least {FRAME_FACTOR} frames)")
    return n


def frame_indices(total: int, video_fps: float, max_frames: int) -> tuple[np.ndarray, int]:
    """(indices of the frames the model sees, n): qwen-vl-utils samples n frames (step 1), lmms_eval
    keeps at most `max_frames` of them (step 3)."""
    n = smart_nframes(total, video_fps)
    fetched = torch.linspace(0, total - 1, n).round().long().numpy()
    keep = np.unique(np.linspace(0, n - 1, max_frames, dtype=int))
    if n - 1 not in keep:
        keep = np.unique(np.append(keep, n - 1))
    return fetched[keep], n


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`: multiples of `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise VideoError(f"a {width}x{height} video: Qwen2.5-VL needs an aspect ratio below {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class QwenPreprocessing:
    """The video preprocessing of a Qwen2.5-VL checkpoint as lmms_eval runs it."""

    mean: list[float]
    std: list[float]
    rescale: float
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int = LMMS_MIN_PIXELS
    max_pixels: int = LMMS_MAX_PIXELS

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def frame_size(self, height: int, width: int, fetched: int) -> tuple[int, int]:
        """The resized (height, width) of every frame (qwen-vl-utils `fetch_video`'s pixel budget
        for the `fetched` frames it read)."""
        frame_max = VIDEO_MAX_TOKEN_NUM * self.factor ** 2
        total_pixels = MODEL_SEQ_LEN * self.factor ** 2 * 0.9
        min_pixels = self.min_pixels  # lmms_eval passes its own (qwen-vl-utils' default: 128 tokens)
        max_pixels = max(min(frame_max, total_pixels / fetched * FRAME_FACTOR), int(min_pixels * 1.05))
        max_pixels = min(self.max_pixels, max_pixels)
        return smart_resize(height, width, self.factor, min_pixels, max_pixels)

    def resize(self, frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (F, H, W, 3) -> float32 (F, 3, h, w) with whole values: torchvision v1 `resize`
        (bicubic, antialias) on a uint8 tensor: float32 interpolation, clamp, round, uint8."""
        if frames.dtype != np.uint8:
            raise VideoError(f"frames must be uint8 RGB, got {frames.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        x = nnf.interpolate(x, size=list(size), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0, 255).round().to(torch.uint8).float()

    def normalize(self, video: torch.Tensor) -> torch.Tensor:
        """The processor's fused rescale-and-normalise of (F, 3, h, w)."""
        return normalize(video, self.mean, self.std, self.rescale)

    def patchify(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(F, C, h, w) -> ((t*gh*gw, C*tp*p*p) patches, (t, gh, gw)): `Qwen2VLVideoProcessor.patchify`."""
        frames, channel, height, width = video.shape
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -frames % tp:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
            frames += pad
        t, gh, gw = frames // tp, height // p, width // p
        patches = video.view(t, tp, channel, gh // m, m, p, gw // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(t * gh * gw, channel * tp * p * p), (t, gh, gw)


@dataclass
class QwenVideo:
    """A video ready for Qwen2.5-VL's vision tower."""

    pixels: torch.Tensor  # (t*gh*gw, C*2*14*14) patches in the processor's layout
    grid_thw: tuple[int, int, int]  # temporal patches, patch rows, patch columns
    second_per_grid: float  # seconds one temporal patch spans (temporal_patch_size / sampled fps)


def load_qwen_video(path: str | Path, frames: int, pre: QwenPreprocessing) -> QwenVideo:
    """The video at `path` as lmms_eval's qwen2_5_vl model feeds it (see the module docstring)."""
    reader = open_video(path)
    try:
        total, fps = len(reader), float(reader.get_avg_fps())
        indices, fetched = frame_indices(total, fps, frames)
        raw = reader.get_batch(list(indices)).asnumpy()
    except VideoError:
        raise
    except Exception as err:  # decord raises bare RuntimeError/DECORDError for corrupt files
        raise VideoError(f"cannot decode video {path}: {str(err).splitlines()[0]}") from err
    size = pre.frame_size(raw.shape[1], raw.shape[2], fetched)
    pixels, grid = pre.patchify(pre.normalize(pre.resize(raw, size)))
    # the sampled frame rate of the frames the model sees (VideoMetadata.sampled_fps)
    sampled_fps = len(indices) / total * fps
    return QwenVideo(pixels, grid, pre.temporal_patch_size / sampled_fps)


def video_tokens(path: str | Path, frames: int, pre: QwenPreprocessing) -> int:
    """How many video tokens the video at `path` becomes (from its size; nothing decoded)."""
    reader = open_video(path)
    try:
        total, fps = len(reader), float(reader.get_avg_fps())
        height, width = reader[0].shape[:2]
    except Exception as err:
        raise VideoError(f"cannot decode video {path}: {str(err).splitlines()[0]}") from err
    indices, fetched = frame_indices(total, fps, frames)
    h, w = pre.frame_size(height, width, fetched)
    temporal = -(-len(indices) // pre.temporal_patch_size)
    return temporal * (h // pre.factor) * (w // pre.factor)
