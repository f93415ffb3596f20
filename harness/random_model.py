"""Real-size LLaVA-OneVision architectures with random weights: every code path at real dimensions,
without downloading anything.

`random_model_dir` writes a model directory like a checkpoint's, minus the weights: the
architecture's config (the published shapes, declared once in conf/model/<name>.yaml `arch`), the
offline byte-level tokenizer and chat template of the embedded models, SigLIP's preprocessing, and
RANDOM_WEIGHTS.json with the seed. The adapter (harness.llava) sees that file and initialises the
weights itself, seeded, directly in the target dtype on the target device, so nothing large is ever
written or read. The directory is keyed by the architecture and seed and is rebuilt when they change.
Scores of such a model are meaningless; the harness labels them "random weights".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from harness.identity import digest

MARKER = "RANDOM_WEIGHTS.json"
PREPROCESSING = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],  # SigLIP's, as llava-hf's
                 "size": {"height": 384, "width": 384}, "rescale_factor": 1 / 255, "resample": 3}


def llava_config(arch: dict, tokenizer):
    """A LlavaOnevisionConfig from `arch` (vision_config, text_config and top-level fields), with
    the special token ids of `tokenizer`."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    arch = dict(arch)
    vision = SiglipVisionConfig(**{"vision_use_head": False, **arch.pop("vision_config")})
    text = dict(arch.pop("text_config"))
    rope = text.pop("rope_theta", None)
    if rope is not None:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope}
    text = Qwen2Config(**text, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        tie_word_embeddings=text.tie_word_embeddings, **arch)


def random_model_dir(root: str | Path, name: str, arch: dict, seed: int) -> Path:
    """The weightless model directory of architecture `arch` under `root` (built if absent)."""
    from harness.tiny_model import CHAT_TEMPLATE, _byte_level_tokenizer

    if not arch.get("vision_config") or not arch.get("text_config"):
        raise ValueError(f"model.arch of {name}: expected vision_config and text_config (the shapes "
                         "random_init builds)")
    recipe = {"arch": arch, "seed": seed, "version": 1}
    directory = Path(root) / f"random-{name}-{digest(recipe)[:10]}"
    if (directory / MARKER).is_file():
        return directory
    tmp = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_tokenizer()
    llava_config(arch, tokenizer).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSING))
    (tmp / MARKER).write_text(json.dumps({"seed": seed, "arch": arch}, indent=1))
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def random_seed(directory: Path) -> int | None:
    """The seed of a weightless random-init directory, or None for a checkpoint."""
    marker = Path(directory) / MARKER
    return json.loads(marker.read_text())["seed"] if marker.is_file() else None
