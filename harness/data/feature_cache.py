"""On-disk cache of pooled vision features, so sweeping a compressor's knob skips the encoder.

An entry is keyed by the model fingerprint (config, weight files, dtype, device type), the video
file (absolute path, size, modification time), the number of frames, the preprocessing, whether
patch attention scores were computed, and the encoder-stage method acting inside the encoder (its
name and knobs, e.g. ToMe's), if any; anything else cannot produce the same features, so an entry
from a different model, config or encoder-stage setting is never used. An entry holds the
VisualInput and the family's `Encoded.extras` (OneVision's newline token, Qwen2.5-VL's temporal
position step).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data.video import VideoError
from harness.files import atomic_path, digest
from harness.models.base import Encoded
from methods.core.base import ENCODER_NEEDS, EncoderStage, VisualInput, encoder_stage


class FeatureCache:
    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root) / fingerprint[:16]
        self.fingerprint = fingerprint

    def key(self, video: str, frames: int, preprocessing, needs: frozenset) -> str:
        st = Path(video).stat()
        ident = {"model": self.fingerprint, "video": str(Path(video).resolve()), "size": st.st_size,
                 "mtime": st.st_mtime_ns, "frames": frames, "pre": vars(preprocessing),
                 "needs": sorted(set(needs) & ENCODER_NEEDS), "version": 3}
        encoder = [n.identity for n in needs if isinstance(n, EncoderStage)]
        if encoder:  # (absent otherwise: every other method's entries keep their keys)
            ident["encoder"] = encoder
        return digest(ident)

    def load(self, key: str, device) -> Encoded | None:
        path = self.root / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001  (a torn or damaged entry of any kind is recomputed)
            print(f"note: feature cache entry {path} is unreadable ({type(err).__name__}); encoding the "
                  "video again", file=sys.stderr)
            path.unlink(missing_ok=True)
            return None
        patch_grid = entry.get("patch_grid")
        visual = VisualInput(entry["features"], tuple(entry["grid"]), entry.get("patch_scores"),
                             entry.get("patch_keys"), entry.get("encoder_hidden"),
                             tuple(patch_grid) if patch_grid is not None else None, bool(entry.get("mrope", False)))
        # the encoder did not run now: its compute time is the one measured when the entry was made,
        # so methods compare on what encoding costs whatever the cache held (cached=True marks it);
        # patch scoring is the compressor's work and its time counts for the method that needs it
        timings = {"vision": float(entry.get("vision_seconds", 0.0)), "scoring": float(entry.get("scoring_seconds", 0.0))}
        return Encoded(visual, entry["extras"], timings, cached=True)

    def save(self, key: str, encoded: Encoded) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        v = encoded.visual
        entry = {"features": v.features.cpu(), "grid": list(v.grid), "mrope": v.mrope,
                 "extras": {k: t.cpu() for k, t in encoded.extras.items()}}
        if v.patch_grid is not None:
            entry["patch_grid"] = list(v.patch_grid)
        for name in ("patch_scores", "patch_keys", "encoder_hidden"):
            if getattr(v, name) is not None:
                entry[name] = getattr(v, name).cpu()
        if v.patch_scores is not None:
            entry["scoring_seconds"] = torch.tensor(encoded.timings.get("scoring", 0.0))
        entry["vision_seconds"] = torch.tensor(encoded.timings.get("vision", 0.0))
        with atomic_path(self.root / f"{key}.pt") as tmp:  # readers never see half an entry
            torch.save(entry, tmp)


@dataclass
class VideoInput:
    """A video read for the encoder: its cache entry (`encoded`), or its decoded and preprocessed
    frames (`pixels`) with the cache key they will be stored under."""

    path: str
    encoded: Encoded | None = None
    pixels: object = None
    key: str | None = None
    seconds: float = 0.0  # reading it took (decoding and preprocessing, or loading the entry)


def read_input(adapter, path: str, frames: int, needs: frozenset, cache: FeatureCache | None) -> VideoInput:
    """The cached encoding of the video at `path`, else its frames read and preprocessed as the
    model's processor would (no model runs here: safe in a background thread)."""
    started = time.perf_counter()
    if not Path(path).is_file():
        raise VideoError(f"video file not found: {path}")
    key = cache.key(path, frames, adapter.preprocessing, needs) if cache is not None else None
    encoded = cache.load(key, adapter.device) if key else None
    pixels = adapter.load_video(path, frames) if encoded is None else None
    return VideoInput(path, encoded, pixels, key, time.perf_counter() - started)


def encode_input(adapter, video: VideoInput, needs: frozenset, cache: FeatureCache | None) -> Encoded:
    """The encoded video: its cache entry, or its frames through the vision side (then stored). An
    encoder-stage method is planned on the adapter's encoder even when its features come from the
    cache, so that what it reports (`notes()`: ToMe's tokens per frame) does not depend on the cache."""
    if video.encoded is not None:
        encoder = encoder_stage(needs)
        if encoder is not None:
            encoder.encoder_policy(adapter.vision_shape)
        return video.encoded
    encoded = adapter.encode_video(video.pixels, needs)
    if video.key is not None:
        cache.save(video.key, encoded)
    return encoded


def encode_file(adapter, path: str, frames: int, needs: frozenset,
                cache: FeatureCache | None) -> Encoded:
    """The encoded video at `path`: from the cache when it holds it, else read, encoded, stored."""
    return encode_input(adapter, read_input(adapter, path, frames, needs, cache), needs, cache)
