"""The embedded smoke model: a randomly initialised LLaVA-OneVision, shrunk to a few MB.

It has the real architecture (SigLIP 384/14 encoder giving 27x27 patches, 2-layer MLP projector,
Qwen2 decoder, image_newline) so every code path is the one the real checkpoints take; only the
widths, depths and the vocabulary are small. It is written to disk as a normal Hugging Face model
directory and loaded through the same `from_pretrained` code as the real models.
Its answers are random: it exists to exercise the harness, never to produce a number to report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from harness.models.llava_onevision import LlavaOneVision

TINY_SHAPE = dict(
    vision_hidden=32, vision_layers=2, vision_heads=2,
    text_hidden=64, text_layers=8, text_heads=4, text_kv_heads=2,
)


def _recipe(seed: int) -> str:
    return "recipe: " + json.dumps({"shape": TINY_SHAPE, "seed": seed, "version": 3}, sort_keys=True)


def build_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny model, tokenizer and preprocessing files to `directory` (idempotent)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              Qwen2Config, SiglipVisionConfig)

    directory = Path(directory)
    recipe = _recipe(seed)
    marker = directory / "SMOKE_MODEL.txt"
    if marker.is_file() and recipe in marker.read_text():
        return directory
    if directory.exists():  # built by an older recipe (other shape or seed): replace it
        shutil.rmtree(directory)
    tmp = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    tokenizer = LlavaOneVision.offline_tokenizer()
    s = TINY_SHAPE
    vision = SiglipVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
        image_size=384, patch_size=14, vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=s["text_hidden"], intermediate_size=2 * s["text_hidden"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], vocab_size=len(tokenizer),
        max_position_embeddings=32768, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=False,  # tied random embeddings just echo the last prompt token
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random init leaves image_newline at zeros-ish scale; give it the embeddings' scale.
        model.model.image_newline.normal_(0.0, 0.02)
        # Make the option letters loud in the output head, so the random model answers with
        # letters (which one still depends on the video) and the smoke scores move with the
        # compression instead of being 0 everywhere.
        letters = tokenizer.convert_tokens_to_ids(list("ABCD"))
        model.lm_head.weight[letters] *= 50.0
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "chat_template.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "size": {"height": 384, "width": 384}, "rescale_factor": 1 / 255,
    }))
    (tmp / "SMOKE_MODEL.txt").write_text(
        f"Randomly initialised LLaVA-OneVision for smoke tests. Not a trained model.\n{recipe}\n")
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
