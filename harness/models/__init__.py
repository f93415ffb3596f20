"""Model adapters, one file per family, behind one interface (harness/models/base.py).

`conf/model/<name>.yaml` names its family (`family: llava_onevision`); the runner, the lmms_eval
model and the bench load the adapter through `adapter_class(family)`, never by model name.
"""

from __future__ import annotations

import importlib

# family -> (module, class): adding a family is one adapter file and one line here
FAMILIES = {
    "llava_onevision": ("harness.models.llava_onevision", "LlavaOneVision"),
    "qwen2_5_vl": ("harness.models.qwen2_5_vl", "Qwen2_5_VL"),
    "qwen3_vl": ("harness.models.qwen3_vl", "Qwen3_VL"),
}


def adapter_class(family: str):
    """The adapter class of `family`; an unknown family is an error naming the known ones."""
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: expected one of {', '.join(FAMILIES)}")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def family_of(path: str) -> str:
    """The family of the model directory at `path`, from its config.json's model_type (for entry
    points without a model config: `harness.bench --model`, lmms_eval's `--model_args`)."""
    import json
    from pathlib import Path

    import transformers

    config = Path(path).expanduser() / "config.json"
    if not config.is_file():  # a hub id: its config in the local Hugging Face cache
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        config = Path(cached) if isinstance(cached, str) else config
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    for family in FAMILIES:
        if getattr(transformers, _model_class(family)).config_class.model_type == model_type:
            return family
    raise ValueError(f"{path}: its config.json ({'model_type ' + repr(model_type) if config.is_file() else 'not found'}) "
                     f"names none of the families ({', '.join(FAMILIES)}); give the family explicitly")


def _model_class(family: str) -> str:
    return adapter_class(family).model_class
