"""Qwen3-VL's video input, step for step as lmms_eval's `qwen3_vl` model produces it, without
torchvision.

lmms_eval 0.7.3 (`lmms_eval/models/simple/qwen3_vl.py`, defaults min_pixels=256*28*28,
max_pixels=1605632, max_num_frames = model.frames, fps and total_pixels unset) hands each video to
qwen-vl-utils' `process_vision_info(..., image_patch_size=16, return_video_metadata=True)` as
{"video": path, "min_pixels", "max_pixels", "nframes": min(max_num_frames, frames in the file)},
then to the processor with the returned `do_sample_frames=False`, the frames' metadata and
`do_resize=False` (transformers' `Qwen3VLProcessor` and `Qwen3VLVideoProcessor`,
`models/qwen3_vl/processing_qwen3_vl.py` and `video_processing_qwen3_vl.py`):

1. qwen-vl-utils `fetch_video` (decord backend): `smart_nframes` with `nframes` rounds it to a
   multiple of 2 (Python's round, half to even) and refuses a count outside [2, total]; indices
   `linspace(0, total-1, n).round()` (no further subsampling: lmms_eval asked for the count);
2. `smart_resize` of the frame size to multiples of 32 (patch 16 x merge 2) within [min_pixels,
   min(max_pixels, max(min(768*32*32, total_pixels/n*2), 1.05*min_pixels))], total_pixels =
   128000*32*32*0.9; torchvision's (v1) bicubic antialiased resize of the uint8 frames (float32
   interpolation, clamp, round, uint8), then `.float()`;
3. the video processor: no resize (`do_resize=False`), the fused rescale-and-normalise
   (x - mean/rf) / (std/rf) with the checkpoint's mean/std (0.5, 0.5, 0.5 for the published ones),
   the last frame repeated to a multiple of temporal_patch_size = 2 (already one), `patchify`'s
   layout: (t, h/2, w/2, 2, 2) patches of C x 2 x 16 x 16;
4. the processor's prompt: the video placeholder becomes, per temporal patch, `<{t:.1f} seconds>`
   `<|vision_start|>` + N video tokens + `<|vision_end|>`, t the mean of the patch's first and last
   frame times (`_calculate_timestamps`: frame index / the file's fps, from the metadata
   qwen-vl-utils returns).

Only the sampled frames are decoded and resized (resizing is per frame, so the pixels are the
same). Deviation: qwen-vl-utils reads with torchcodec when it is installed and with decord
otherwise; the harness always reads with decord (as for Qwen2.5-VL; the fps of the timestamps is
decord's `get_avg_fps`, which qwen-vl-utils puts in the metadata on that path). tests/test_qwen3_vl.py checks every step against the source of qwen-vl-utils, lmms_eval and
transformers (compiled from their files: the modules themselves import torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.data.video import VideoError, open_video
from harness.models.qwen2_5_vl_video import FRAME_FACTOR, QwenPreprocessing

# lmms_eval/models/simple/qwen3_vl.py defaults
LMMS_MIN_PIXELS, LMMS_MAX_PIXELS = 256 * 28 * 28, 1605632
LMMS_SYSTEM_PROMPT = "You are a helpful assistant."


def frame_indices(total: int, frames: int) -> np.ndarray:
    """Indices of the frames the model sees: lmms_eval asks qwen-vl-utils for min(frames, total),
    `smart_nframes` rounds that to a multiple of FRAME_FACTOR (step 1)."""
    n = round(min(frames, total) / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total:
        raise VideoError(f"a video of {total} frames cannot be sampled as lmms_eval's qwen3_vl does "
                         f"(nframes={min(frames, total)} rounds to {n}, outside [{FRAME_FACTOR}, {total}])")
    return torch.linspace(0, total - 1, n).round().long().numpy()


def patch_timestamps(indices, fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """Seconds of each temporal patch: `Qwen3VLProcessor._calculate_timestamps` (the frame list
    padded with its last index to a multiple of the patch size, each patch the mean of its first and
    last frame's time)."""
    indices = [int(i) for i in indices]
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    seconds = [i / fps for i in indices]
    return tuple((seconds[i] + seconds[i + temporal_patch_size - 1]) / 2
                 for i in range(0, len(seconds), temporal_patch_size))


def timestamp_text(seconds: float) -> str:
    """The text before a temporal patch's tokens (`Qwen3VLProcessor.replace_video_token`)."""
    return f"<{seconds:.1f} seconds>"


@dataclass
class Qwen3Video:
    """A video ready for Qwen3-VL's vision tower."""

    pixels: torch.Tensor  # (t*gh*gw, C*2*16*16) patches in the processor's layout
    grid_thw: tuple[int, int, int]  # temporal patches, patch rows, patch columns
    timestamps: tuple[float, ...]  # seconds of each temporal patch (its timestamp text)


def _read(path: str | Path, frames: int):
    reader = open_video(path)
    try:
        total, fps = len(reader), float(reader.get_avg_fps())
        return reader, total, fps, frame_indices(total, frames)
    except VideoError:
        raise
    except Exception as err:  # decord raises bare RuntimeError/DECORDError for corrupt files
        raise VideoError(f"cannot decode video {path}: {str(err).splitlines()[0]}") from err


def load_qwen3_video(path: str | Path, frames: int, pre: QwenPreprocessing) -> Qwen3Video:
    """The video at `path` as lmms_eval's qwen3_vl model feeds it (see the module docstring)."""
    reader, _, fps, indices = _read(path, frames)
    try:
        raw = reader.get_batch(list(indices)).asnumpy()
    except Exception as err:  # decord raises bare RuntimeError/DECORDError for corrupt files
        raise VideoError(f"cannot decode video {path}: {str(err).splitlines()[0]}") from err
    size = pre.frame_size(raw.shape[1], raw.shape[2], len(indices))
    pixels, grid = pre.patchify(pre.normalize(pre.resize(raw, size)))
    return Qwen3Video(pixels, grid, patch_timestamps(indices, fps, pre.temporal_patch_size))


def video_timestamps(path: str | Path, frames: int, pre: QwenPreprocessing) -> tuple[float, ...]:
    """The timestamps `load_qwen3_video` gives the video at `path` (from its frame count and rate;
    nothing decoded)."""
    _, _, fps, indices = _read(path, frames)
    return patch_timestamps(indices, fps, pre.temporal_patch_size)


def video_tokens(path: str | Path, frames: int, pre: QwenPreprocessing) -> int:
    """How many video tokens the video at `path` becomes (from its size; nothing decoded)."""
    reader, _, _, indices = _read(path, frames)
    try:
        height, width = reader[0].shape[:2]
    except Exception as err:
        raise VideoError(f"cannot decode video {path}: {str(err).splitlines()[0]}") from err
    h, w = pre.frame_size(height, width, len(indices))
    temporal = -(-len(indices) // pre.temporal_patch_size)
    return temporal * (h // pre.factor) * (w // pre.factor)
