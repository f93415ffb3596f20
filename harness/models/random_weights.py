"""Real-size architectures with random weights: every code path at real dimensions, without
downloading anything, for every model family.

`random_model_dir` writes a model directory like a checkpoint's, minus the weights: the
architecture's config (the published shapes, declared once in conf/model/<name>.yaml `arch`, made
into the family's transformers config by its adapter's `config_from_arch`), the family's offline
byte-level tokenizer and chat template, its preprocessing file, and RANDOM_WEIGHTS.json with the
seed. The adapter (harness/models/base.py) sees that file and initialises the weights itself
(`random_weights`), seeded, directly in the target dtype on the target device, so nothing large is
ever written or read. The directory is keyed by the family, architecture and seed and is rebuilt
when they change. Scores of such a model are meaningless; the harness labels them "random weights".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.files import digest
from harness.models.model_dir import write_model_dir

MARKER = "RANDOM_WEIGHTS.json"


def random_model_dir(root: str | Path, name: str, arch: dict, seed: int,
                     family: str = "llava_onevision") -> Path:
    """The weightless model directory of architecture `arch` of `family` under `root` (built if absent)."""
    from harness.models import adapter_class

    adapter = adapter_class(family)
    if not arch.get("vision_config") or not arch.get("text_config"):
        raise ValueError(f"model.arch of {name}: expected vision_config and text_config (the shapes "
                         "random_init builds)")
    recipe = {"family": family, "arch": arch, "seed": seed, "version": 2}
    directory = Path(root) / f"random-{name}-{digest(recipe)[:10]}"
    if (directory / MARKER).is_file():
        return directory
    tokenizer = adapter.offline_tokenizer()
    config = adapter.config_from_arch(arch, tokenizer)  # a shape the config rejects fails here
    return write_model_dir(directory, weights=config, tokenizer=tokenizer,
                           preprocessor=adapter.OFFLINE_PREPROCESSOR, marker=MARKER,
                           stamp={"seed": seed, "arch": arch, "family": family})


def random_seed(directory: Path) -> int | None:
    """The seed of a weightless random-init directory, or None for a checkpoint."""
    marker = Path(directory) / MARKER
    return json.loads(marker.read_text())["seed"] if marker.is_file() else None


def random_weights(model_class, directory: Path, seed: int, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str):
    """The model of `directory`'s config with seeded random weights (the model's own initialiser),
    built directly on `device` in `dtype`: no full-size float32 copy and nothing read from disk."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
