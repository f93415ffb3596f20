"""Reading videos and turning frames into the vision encoder's input, without torchvision.

Matches LLaVA-OneVision's video preprocessing step for step (transformers'
`LlavaOnevisionVideoProcessor`, whose resize is torchvision's `resize` on the uint8 frames): uniform
frame sampling as lmms_eval's llava_onevision model does, a bicubic antialiased resize of the uint8
frames to the encoder's square input (torch's uint8 kernel, which torchvision uses on the CPU, so
the resized pixels are whole numbers as there), then the fused rescale-and-normalise,
(x - 255 mean) / (255 std). tests/test_preprocessing.py proves the equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf


def encode_mp4(target, frames: np.ndarray, fps: int) -> None:
    """Write uint8 (F, H, W, 3) RGB frames as an H.264 (else MPEG-4) yuv420p .mp4 to `target` (a
    path or a binary file object), the same pixels every time: x264 at a constant quantiser, one
    thread (its rate control's lookahead and threads make a few pixels vary from run to run, by up
    to ~25 levels, and generated data must not)."""
    import av

    with av.open(target, "w", format="mp4") as container:
        if "libx264" in av.codecs_available:
            stream = container.add_stream("libx264", rate=fps, options={"qp": "20", "threads": "1", "preset": "ultrafast"})
        else:
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count, stream.codec_context.thread_type = 1, "NONE"
        for t, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = t  # in 1/fps units (the stream's rate)
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


class VideoError(RuntimeError):
    """A video that cannot be used: missing, unreadable, or without frames."""


def uniform_indices(total: int, count: int) -> np.ndarray:
    """`count` frame indices spread evenly over [0, total-1] (lmms_eval's llava_onevision rule)."""
    return np.linspace(0, total - 1, count, dtype=int)


def open_video(path: str | Path):
    """A decord reader of the video at `path` (VideoError if it is missing, unreadable or empty)."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    import decord  # an extra: only needed when videos are actually read

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as err:  # decord raises bare RuntimeError/DECORDError for corrupt files
        raise VideoError(f"cannot decode video {path}: {str(err).splitlines()[0]}") from err
    if len(reader) == 0:
        raise VideoError(f"video has no frames: {path}")
    return reader


def read_frames(path: str | Path, count: int) -> np.ndarray:
    """`count` uniformly sampled RGB frames of the video at `path` as uint8 (count, H, W, 3)."""
    reader = open_video(path)
    try:
        return reader.get_batch(list(uniform_indices(len(reader), count))).asnumpy()
    except VideoError:
        raise
    except Exception as err:  # decord raises bare RuntimeError/DECORDError for corrupt files
        raise VideoError(f"cannot decode video {path}: {str(err).splitlines()[0]}") from err


def preprocess(frames: np.ndarray, size: int, mean, std, rescale: float = 1 / 255) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, size, size), resized, rescaled and normalised."""
    if frames.dtype != np.uint8:
        raise VideoError(f"frames must be uint8 RGB, got {frames.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    x = nnf.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return normalize(x, mean, std, rescale)


def normalize(x: torch.Tensor, mean, std, rescale: float = 1 / 255) -> torch.Tensor:
    """transformers' fused rescale-and-normalise of (F, 3, H, W) pixel values, as its video processors
    do it (`BaseVideoProcessor.rescale_and_normalize`: mean and std multiplied by 1/rescale, then
    (x - mean) / std in float32)."""
    mean = torch.tensor(mean, dtype=torch.float32) * (1.0 / rescale)
    std = torch.tensor(std, dtype=torch.float32) * (1.0 / rescale)
    return (x.to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
