"""The embedded smoke model: a randomly initialised LLaVA-OneVision, shrunk to a few MB.

It has the real architecture (SigLIP 384/14 encoder giving 27x27 patches, 2-layer MLP projector,
Qwen2 decoder, image_newline) so every code path is the one the real checkpoints take; only the
widths, depths and the vocabulary are small. It is written to disk as a normal Hugging Face model
directory and loaded through the same `from_pretrained` code as the real models.
Its answers are random: it exists to exercise the harness, never to produce a number to report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from harness.models.llava_onevision import LlavaOneVision
from harness.models.model_dir import write_model_dir

MARKER = "SMOKE_MODEL.txt"
TINY_ARCH = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 384, "patch_size": 14},
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                    "tie_word_embeddings": False},  # tied random embeddings just echo the last prompt token
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
}


def _recipe(seed: int) -> str:
    return "recipe: " + json.dumps({"arch": TINY_ARCH, "seed": seed, "version": 4}, sort_keys=True)


def build_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny model, tokenizer and preprocessing files to `directory` (idempotent)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    directory = Path(directory)
    recipe = _recipe(seed)
    marker = directory / MARKER
    if marker.is_file() and recipe in marker.read_text():
        return directory
    if directory.exists():  # built by an older recipe (other shape or seed): replace it
        shutil.rmtree(directory)
    tokenizer = LlavaOneVision.offline_tokenizer()
    arch = {**TINY_ARCH, "text_config": {**TINY_ARCH["text_config"], "vocab_size": len(tokenizer)}}
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(LlavaOneVision.config_from_arch(arch, tokenizer)).eval()
    with torch.no_grad():
        # Random init leaves image_newline at zeros-ish scale; give it the embeddings' scale.
        model.model.image_newline.normal_(0.0, 0.02)
        # Make the option letters loud in the output head, so the random model answers with
        # letters (which one still depends on the video) and the smoke scores move with the
        # compression instead of being 0 everywhere.
        letters = tokenizer.convert_tokens_to_ids(list("ABCD"))
        model.lm_head.weight[letters] *= 50.0
    return write_model_dir(directory, weights=model, tokenizer=tokenizer,
                           preprocessor=LlavaOneVision.OFFLINE_PREPROCESSOR, marker=MARKER,
                           stamp=f"Randomly initialised LLaVA-OneVision for smoke tests. Not a trained model.\n{recipe}\n")
